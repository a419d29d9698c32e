//! precopy facade
