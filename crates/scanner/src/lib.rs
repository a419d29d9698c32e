//! precopy-scanner
