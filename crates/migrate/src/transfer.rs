//! [`Transport`] over a `precopy-transfer` [`Transfer`]: a socket sender, an image writer, or an
//! in-memory sink.

use crate::control::{BoxError, RoundSent, Transport};
use precopy_transfer::{PageSource, Sink, Transfer, memory_checksum};
use std::ops::Range;
use std::time::Instant;

/// Sends rounds with a [`Transfer`]; the final checksum is computed from its source.
#[derive(Debug)]
pub struct TransferTransport<S, K> {
    transfer: Transfer<S, K>,
}

impl<S: PageSource, K: Sink> TransferTransport<S, K> {
    /// Wraps `transfer`, which must not have sent a round yet.
    pub fn new(transfer: Transfer<S, K>) -> Self {
        TransferTransport { transfer }
    }

    /// The transfer.
    pub fn transfer(&self) -> &Transfer<S, K> {
        &self.transfer
    }

    /// The transfer back.
    pub fn into_inner(self) -> Transfer<S, K> {
        self.transfer
    }
}

impl<S: PageSource, K: Sink> Transport for TransferTransport<S, K> {
    fn send_round(&mut self, ranges: &[Range<u64>]) -> Result<RoundSent, BoxError> {
        let r = self.transfer.send_round(ranges)?;
        Ok(RoundSent {
            pages: r.pages,
            zero_pages: r.zero_pages,
            bytes: r.bytes_on_wire,
            duration: r.duration,
        })
    }

    fn finish(&mut self) -> Result<(u32, std::time::Duration), BoxError> {
        let start = Instant::now();
        let layout = self.transfer.layout().clone();
        let checksum = memory_checksum(self.transfer.source_mut(), &layout)?;
        let took = start.elapsed();
        self.transfer.finish(checksum)?;
        Ok((checksum, took))
    }
}
