//! The shared key and the handshake's challenge-response (HMAC-SHA256).
//!
//! Owns the key material and the only computation done with it. The key never
//! crosses the wire; each side proves it holds the key by MACing both nonces,
//! the session id and the connection index under a side-specific label.
//!
//! SHA-256 is implemented here (FIPS 180-4, checked against its published test
//! vectors and RFC 4231's HMAC vectors) because the workspace carries no
//! digest crate; swapping in `sha2` + `hmac` changes nothing on the wire.

use std::fmt;
use std::path::Path;

use crate::error::TransferError;
use crate::protocol::{MAC_LEN, NONCE_LEN};

/// Fewest bytes a key may have.
pub const MIN_KEY_LEN: usize = 16;

/// A shared secret both ends of a transfer hold.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A key from raw bytes (at least [`MIN_KEY_LEN`]).
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Result<Key, TransferError> {
        let bytes = bytes.into();
        if bytes.len() < MIN_KEY_LEN {
            return Err(TransferError::BadKey {
                path: "<bytes>".into(),
                reason: "key is shorter than 16 bytes",
            });
        }
        Ok(Key(bytes))
    }

    /// Reads a key file: its bytes, less trailing whitespace, at least
    /// [`MIN_KEY_LEN`] bytes.
    pub fn from_file(path: &Path) -> Result<Key, TransferError> {
        let mut bytes = std::fs::read(path).map_err(|source| TransferError::KeyFile {
            path: path.to_owned(),
            source,
        })?;
        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
            bytes.pop();
        }
        if bytes.len() < MIN_KEY_LEN {
            return Err(TransferError::BadKey {
                path: path.to_owned(),
                reason: "key is shorter than 16 bytes",
            });
        }
        Ok(Key(bytes))
    }
}

/// Which end a proof comes from (so one side's proof cannot be replayed as
/// the other's).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Role {
    Sender,
    Receiver,
}

/// The proof `role` sends on connection `index` of `session`.
pub(crate) fn proof(
    key: &Key,
    role: Role,
    sender_nonce: &[u8; NONCE_LEN],
    receiver_nonce: &[u8; NONCE_LEN],
    session: u64,
    index: u32,
) -> [u8; MAC_LEN] {
    let mut msg = Vec::with_capacity(64);
    match role {
        Role::Sender => {
            msg.extend_from_slice(b"precopy-v1 sender\0");
            msg.extend_from_slice(receiver_nonce);
            msg.extend_from_slice(sender_nonce);
        }
        Role::Receiver => {
            msg.extend_from_slice(b"precopy-v1 receiver\0");
            msg.extend_from_slice(sender_nonce);
            msg.extend_from_slice(receiver_nonce);
        }
    }
    msg.extend_from_slice(&session.to_le_bytes());
    msg.extend_from_slice(&index.to_le_bytes());
    hmac_sha256(&key.0, &msg)
}

/// Compares two MACs in time independent of where they differ.
pub(crate) fn macs_equal(a: &[u8; MAC_LEN], b: &[u8; MAC_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh random nonce.
pub(crate) fn nonce() -> [u8; NONCE_LEN] {
    rand::random()
}

const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg: Vec<u8> = parts.concat();
    let bit_len = (msg.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (o, x) in out.chunks_exact_mut(4).zip(h) {
        o.copy_from_slice(&x.to_be_bytes());
    }
    out
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&sha256(&[key]));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = sha256(&[&ipad, msg]);
    sha256(&[&opad, &inner])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn sha256_vectors() {
        assert_eq!(
            hex(&sha256(&[b""])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&sha256(&[b"abc"])),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&sha256(&[
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            ])),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
    }

    #[test]
    fn hmac_rfc4231() {
        // Test case 1.
        assert_eq!(
            hex(&hmac_sha256(&[0x0b; 20], b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        // Test case 2.
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: key longer than a block.
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn proofs_differ_by_role_and_key() {
        let k1 = Key::from_bytes(vec![1u8; 32]).unwrap();
        let k2 = Key::from_bytes(vec![2u8; 32]).unwrap();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let s = proof(&k1, Role::Sender, &a, &b, 7, 0);
        assert!(macs_equal(&s, &proof(&k1, Role::Sender, &a, &b, 7, 0)));
        assert!(!macs_equal(&s, &proof(&k1, Role::Receiver, &a, &b, 7, 0)));
        assert!(!macs_equal(&s, &proof(&k2, Role::Sender, &a, &b, 7, 0)));
        assert!(!macs_equal(&s, &proof(&k1, Role::Sender, &a, &b, 7, 1)));
        assert!(Key::from_bytes(vec![0u8; 8]).is_err());
    }
}
