//! precopy-transfer
