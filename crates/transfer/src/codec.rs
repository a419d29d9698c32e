//! Compression of PAGES payloads, in one place: the per-transfer choice
//! ([`Compression`]), the codec byte a PAGES header carries ([`Codec`]), the
//! sender's `Compressor` and the receiver's `Decompressor` (crate-private).
//!
//! A PAGES frame whose payload does not shrink is sent raw (codec 0) whatever
//! the choice, so a receiver always sees the smaller of the two. Compressed
//! payloads are one LZ4 block (`lz4_flex`'s block format, no size prefix) or
//! one zstd frame; the header's raw length says what they decompress to, and
//! a payload that decompresses to anything else is refused
//! ([`ProtocolError::Decompress`]). Images hold raw pages only.

use serde::Serialize;

use crate::error::{ProtocolError, TransferError};

/// Compression of page frames, chosen per transfer (every connection uses it).
/// A frame that does not shrink is sent raw whatever the choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum Compression {
    /// Raw pages (the default: see the crate docs for the measurements).
    #[default]
    None,
    /// LZ4 block compression.
    Lz4,
    /// zstd at the given level (1 is fastest).
    Zstd(i32),
}

/// How one PAGES frame's payload is compressed: the header's codec byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Raw pages.
    None = 0,
    /// One LZ4 block.
    Lz4 = 1,
    /// One zstd frame.
    Zstd = 2,
}

impl Codec {
    /// The codec for a header byte.
    pub fn from_u8(codec: u8) -> Option<Codec> {
        match codec {
            0 => Some(Codec::None),
            1 => Some(Codec::Lz4),
            2 => Some(Codec::Zstd),
            _ => None,
        }
    }

    /// The codec's name.
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "uncompressed",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }
}

/// A sender's compressor: the transfer's choice and the state it keeps
/// between frames (output buffer, zstd context).
pub(crate) struct Compressor {
    choice: Compression,
    out: Vec<u8>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("choice", &self.choice)
            .finish()
    }
}

impl Compressor {
    /// A compressor for `choice`.
    pub(crate) fn new(choice: Compression) -> Compressor {
        Compressor {
            choice,
            out: Vec::new(),
            zstd: None,
        }
    }

    /// Whether the transfer compresses at all.
    pub(crate) fn compresses(&self) -> bool {
        self.choice != Compression::None
    }

    /// Compresses `pages`. `Ok(None)`: send them raw (compression off, or it
    /// did not shrink them); otherwise the codec and the compressed bytes.
    pub(crate) fn compress(
        &mut self,
        pages: &[u8],
    ) -> Result<Option<(Codec, &[u8])>, TransferError> {
        self.out.clear();
        match self.choice {
            Compression::None => Ok(None),
            Compression::Lz4 => {
                // lz4_flex refuses an output buffer below its worst-case
                // bound, even when the result would fit: size it so.
                let bound = lz4_flex::block::get_maximum_output_size(pages.len());
                self.out.resize(bound, 0);
                match lz4_flex::block::compress_into(pages, &mut self.out) {
                    Ok(n) if n < pages.len() => Ok(Some((Codec::Lz4, &self.out[..n]))),
                    _ => Ok(None),
                }
            }
            Compression::Zstd(level) => {
                if self.zstd.is_none() {
                    let z =
                        zstd::bulk::Compressor::new(level).map_err(|source| TransferError::Io {
                            what: "starting the zstd compressor",
                            source,
                        })?;
                    self.zstd = Some(z);
                }
                let Some(z) = self.zstd.as_mut() else {
                    return Ok(None);
                };
                self.out.reserve(pages.len());
                match z.compress_to_buffer(pages, &mut self.out) {
                    Ok(n) if n < pages.len() => Ok(Some((Codec::Zstd, &self.out[..n]))),
                    _ => Ok(None),
                }
            }
        }
    }
}

/// A receiver's decompressor (keeps the zstd context between frames).
#[derive(Default)]
pub(crate) struct Decompressor {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl std::fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decompressor").finish_non_exhaustive()
    }
}

impl Decompressor {
    /// Decompresses `input` (codec `codec`, from the frame at stream offset
    /// `offset`) into all of `out`; anything but exactly `out.len()` bytes
    /// is [`ProtocolError::Decompress`]. [`Codec::None`] copies.
    pub(crate) fn decompress_into(
        &mut self,
        codec: Codec,
        input: &[u8],
        out: &mut [u8],
        offset: u64,
    ) -> Result<(), TransferError> {
        let n = out.len();
        let ok = match codec {
            Codec::None => {
                let same = input.len() == n;
                if same {
                    out.copy_from_slice(input);
                }
                same
            }
            Codec::Lz4 => lz4_flex::block::decompress_into(input, out).is_ok_and(|got| got == n),
            Codec::Zstd => {
                if self.zstd.is_none() {
                    let z =
                        zstd::bulk::Decompressor::new().map_err(|source| TransferError::Io {
                            what: "starting the zstd decompressor",
                            source,
                        })?;
                    self.zstd = Some(z);
                }
                self.zstd
                    .as_mut()
                    .is_some_and(|z| z.decompress_to_buffer(input, out).is_ok_and(|got| got == n))
            }
        };
        if !ok {
            return Err(ProtocolError::Decompress {
                offset,
                codec: codec.name(),
                raw_len: n as u64,
            }
            .into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_wrong_sizes() {
        let pages: Vec<u8> = (0..3 * 4096).map(|i| (i / 64) as u8).collect();
        for choice in [Compression::Lz4, Compression::Zstd(1)] {
            let mut c = Compressor::new(choice);
            let (codec, packed) = c.compress(&pages).unwrap().expect("compressible");
            let packed = packed.to_vec();
            let mut d = Decompressor::default();
            let mut out = vec![0u8; pages.len()];
            d.decompress_into(codec, &packed, &mut out, 0).unwrap();
            assert_eq!(out, pages);
            let mut short = vec![0u8; pages.len() - 4096];
            let e = d
                .decompress_into(codec, &packed, &mut short, 7)
                .unwrap_err();
            assert!(e.to_string().contains("does not decompress"), "{e}");
        }
        // Incompressible bytes, or compression off, go raw.
        let noise: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
        assert!(
            Compressor::new(Compression::Lz4)
                .compress(&noise)
                .unwrap()
                .is_none()
        );
        assert!(
            Compressor::new(Compression::None)
                .compress(&pages)
                .unwrap()
                .is_none()
        );
    }
}
