//! precopy-backends
