//! [`Image::verify`]: every check an image can be put through.

use std::path::Path;

use serde::Serialize;

use super::walk::walk;
use super::{Image, digest_of_locations, file_len, locations_from_index};
use crate::error::{ImageError, ProtocolError};
use crate::protocol::FrameKind;

/// What [`Image::verify`] checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Records whose CRC was checked.
    pub records: u64,
    /// Rounds in the image.
    pub rounds: u64,
    /// The memory checksum, recomputed and matching.
    pub memory_checksum: u64,
}

impl Image {
    /// Checks everything: every record's CRC, the record sequence, that the
    /// image is complete, that the index matches the records, and that the
    /// memory the image holds has the recorded checksum.
    pub fn verify(&self) -> Result<VerifyReport, ImageError> {
        let walk = walk(&self.path, &self.file, true)?;
        if let Some((e, truncated)) = walk.fault {
            return Err(if truncated {
                ImageError::Incomplete {
                    path: self.path.clone(),
                    reason: e.to_string(),
                }
            } else {
                ImageError::Corrupt {
                    path: self.path.clone(),
                    source: e,
                }
            });
        }
        let (Some((rounds, checksum)), Some((trailer_at, trailer))) = (walk.finish, walk.trailer)
        else {
            return Err(ImageError::Incomplete {
                path: self.path.clone(),
                reason: "no final checksum and trailer".to_owned(),
            });
        };
        let corrupt = |reason| ImageError::Corrupt {
            path: self.path.clone(),
            source: ProtocolError::Malformed {
                offset: trailer_at,
                kind: FrameKind::Trailer,
                reason,
            },
        };
        if trailer.digest != checksum {
            return Err(corrupt("trailer checksum differs from FINISH"));
        }
        let file_len = file_len(&self.path, &self.file)?;
        let from_index = locations_from_index(&walk.index, &walk.layout, file_len)
            .ok_or_else(|| corrupt("index does not fit the layout"))?;
        let ps = walk.layout.page_size();
        if let Some(i) = (0..walk.loc.len()).find(|&i| walk.loc[i] != from_index[i]) {
            return Err(ImageError::IndexMismatch {
                path: self.path.clone(),
                offset: i as u64 * ps,
            });
        }
        if self.state()?.is_some() != walk.state.is_some() {
            return Err(corrupt("state record changed while verifying"));
        }
        let actual =
            digest_of_locations(&self.file, &walk.loc, ps).map_err(|source| ImageError::Io {
                path: self.path.clone(),
                what: "reading",
                source,
            })?;
        if actual != checksum {
            return Err(ImageError::ChecksumMismatch {
                expected: checksum,
                actual,
            });
        }
        Ok(VerifyReport {
            records: walk.records,
            rounds,
            memory_checksum: checksum,
        })
    }
}

/// `precopy image verify IMG`: every check [`Image::verify`] does; any `Err`
/// means the image is not good (exit non-zero).
pub fn image_verify(path: impl AsRef<Path>) -> Result<VerifyReport, ImageError> {
    Image::open(path)?.verify()
}
