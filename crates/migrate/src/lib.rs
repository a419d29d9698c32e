//! precopy-migrate
