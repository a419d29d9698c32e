//! Page buffers passed between pipeline stages without copying.
//!
//! A batch of pages is read once into a pooled buffer; the runs of non-zero
//! pages in it travel to sinks as [`PageBuf`] views sharing that buffer. When
//! the last view is dropped the buffer returns to its `BufferPool`, so a
//! steady stream allocates nothing. The pool never blocks: the bound on memory
//! in flight comes from the bounded channels between stages.

use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, bounded};

/// A recycling pool of byte buffers.
#[derive(Debug, Clone)]
pub(crate) struct BufferPool {
    home: Sender<Vec<u8>>,
    free: Receiver<Vec<u8>>,
}

impl BufferPool {
    /// A pool keeping at most `keep` idle buffers.
    pub(crate) fn new(keep: usize) -> BufferPool {
        let (home, free) = bounded(keep.max(1));
        BufferPool { home, free }
    }

    /// A buffer of at least `len` initialized bytes (contents unspecified).
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        let mut v = self.free.try_recv().unwrap_or_default();
        if v.len() < len {
            v.resize(len, 0);
        }
        v
    }

    /// Returns a buffer to the pool (dropped if the pool is full).
    pub(crate) fn give(&self, buf: Vec<u8>) {
        let _ = self.home.try_send(buf);
    }

    /// Wraps a buffer so it returns to this pool when the last view drops.
    pub(crate) fn share(&self, data: Vec<u8>) -> SharedBuf {
        SharedBuf(Arc::new(Pooled {
            data,
            home: Some(self.home.clone()),
        }))
    }
}

struct Pooled {
    data: Vec<u8>,
    home: Option<Sender<Vec<u8>>>,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            // A full pool just frees the buffer.
            let _ = home.try_send(std::mem::take(&mut self.data));
        }
    }
}

/// A buffer shared by the page views cut from it.
#[derive(Clone)]
pub(crate) struct SharedBuf(Arc<Pooled>);

impl fmt::Debug for SharedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBuf")
            .field("len", &self.0.data.len())
            .finish()
    }
}

impl SharedBuf {
    /// A view of `range` of this buffer. Panics if out of bounds (an internal
    /// invariant: callers cut views from lengths they just read).
    pub(crate) fn view(&self, range: Range<usize>) -> PageBuf {
        assert!(range.start <= range.end && range.end <= self.0.data.len());
        PageBuf {
            buf: self.clone(),
            range,
        }
    }
}

/// Whole pages handed to a [`Sink`](crate::Sink): a read-only view of a
/// (possibly shared, pooled) buffer.
#[derive(Clone)]
pub struct PageBuf {
    buf: SharedBuf,
    range: Range<usize>,
}

impl fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageBuf").field("len", &self.len()).finish()
    }
}

impl PageBuf {
    /// Pages in a plain vector (not pooled).
    pub fn from_vec(data: Vec<u8>) -> PageBuf {
        let len = data.len();
        PageBuf {
            buf: SharedBuf(Arc::new(Pooled { data, home: None })),
            range: 0..len,
        }
    }
}

impl Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf.0.data[self.range.clone()]
    }
}

impl AsRef<[u8]> for PageBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

/// Whether `page` is all zero bytes.
pub fn is_zero(page: &[u8]) -> bool {
    // Wide chunks let the compiler vectorize; most non-zero pages exit in the
    // first chunk.
    let mut chunks = page.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_return_to_pool_when_last_view_drops() {
        let pool = BufferPool::new(2);
        let mut v = pool.take(8192);
        v[0] = 1;
        let shared = pool.share(v);
        let a = shared.view(0..4096);
        let b = shared.view(4096..8192);
        drop(shared);
        drop(a);
        assert!(pool.free.is_empty());
        assert_eq!(b.len(), 4096);
        drop(b);
        assert_eq!(pool.free.len(), 1);
        let v = pool.take(100);
        assert_eq!(v.len(), 8192);
        assert_eq!(v[0], 1);
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[0] = 1;
        assert!(!is_zero(&p));
        assert!(is_zero(&[0u8; 70]));
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 1]));
    }
}
