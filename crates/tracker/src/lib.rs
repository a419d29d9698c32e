//! precopy-tracker
