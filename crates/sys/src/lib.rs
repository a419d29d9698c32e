//! precopy-sys
