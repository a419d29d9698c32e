//! The shared key and the handshake's challenge-response (HMAC-SHA256).
//!
//! Owns the key material and the only computation done with it. The key never
//! crosses the wire; each side proves it holds the key by MACing both nonces,
//! the session id and the connection index under a side-specific label.
//!
//! The MAC is `hmac` over `sha2`'s SHA-256; a peer's proof is checked with
//! `verify_slice`, which compares in constant time.

use std::fmt;
use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::error::TransferError;
use crate::protocol::{MAC_LEN, NONCE_LEN};

type HmacSha256 = Hmac<Sha256>;

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

    /// A fresh random key: 32 random bytes written as 64 hex digits (so it
    /// survives a trip through a text file).
    pub fn random() -> Key {
        let raw: [u8; 32] = rand::random();
        Key(raw
            .iter()
            .flat_map(|b| format!("{b:02x}").into_bytes())
            .collect())
    }

    /// The key's bytes, for handing it to the other end over a private
    /// channel (an inherited pipe, an owner-only file).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Writes the key to a new file at `path` that only this user can read
    /// (mode 0600, created exclusively: an existing file is an error, never
    /// overwritten or reused). For a tool that starts both ends and hands
    /// the key to the other privately.
    pub fn write_new_file(&self, path: &Path) -> Result<(), TransferError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let err = |source| TransferError::KeyFile {
            path: path.to_owned(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        f.write_all(&self.0).map_err(err)
    }

    /// Reads a key file: its bytes, less trailing whitespace, at least
    /// [`MIN_KEY_LEN`] bytes. A file other users may read or write is
    /// refused: it is no secret. So is anything but a regular file
    /// ([`TransferError::KeyNotAFile`]): reading a FIFO would wait for a
    /// writer forever, a device or a directory holds no key. The file is
    /// opened without blocking and checked as opened, not by name.
    pub fn from_file(path: &Path) -> Result<Key, TransferError> {
        use std::io::Read;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let err = |source| TransferError::KeyFile {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(path)
            .map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        if let Some(kind) = crate::image::not_regular(&meta) {
            return Err(TransferError::KeyNotAFile {
                path: path.to_owned(),
                kind,
            });
        }
        if meta.mode() & 0o077 != 0 {
            return Err(TransferError::BadKey {
                path: path.to_owned(),
                reason: "other users may read or write it (chmod 600 it)",
            });
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(err)?;
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

/// The MAC state for the proof `role` sends on connection `index` of
/// `session`: the key, a side-specific label, both nonces (the prover's last),
/// the session and the index, little-endian.
fn proof_mac(
    key: &Key,
    role: Role,
    sender_nonce: &[u8; NONCE_LEN],
    receiver_nonce: &[u8; NONCE_LEN],
    session: u64,
    index: u32,
) -> HmacSha256 {
    let mut mac =
        <HmacSha256 as KeyInit>::new_from_slice(&key.0).expect("HMAC takes a key of any length");
    match role {
        Role::Sender => {
            mac.update(b"precopy-v1 sender\0");
            mac.update(receiver_nonce);
            mac.update(sender_nonce);
        }
        Role::Receiver => {
            mac.update(b"precopy-v1 receiver\0");
            mac.update(sender_nonce);
            mac.update(receiver_nonce);
        }
    }
    mac.update(&session.to_le_bytes());
    mac.update(&index.to_le_bytes());
    mac
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
    proof_mac(key, role, sender_nonce, receiver_nonce, session, index)
        .finalize()
        .into_bytes()
        .into()
}

/// Whether `mac` is the proof `role` owes on connection `index` of `session`,
/// compared in time independent of where it differs.
pub(crate) fn proof_matches(
    key: &Key,
    role: Role,
    sender_nonce: &[u8; NONCE_LEN],
    receiver_nonce: &[u8; NONCE_LEN],
    session: u64,
    index: u32,
    mac: &[u8],
) -> bool {
    proof_mac(key, role, sender_nonce, receiver_nonce, session, index)
        .verify_slice(mac)
        .is_ok()
}

/// A fresh random nonce.
pub(crate) fn nonce() -> [u8; NONCE_LEN] {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn hmac_sha256(key: &[u8], msg: &[u8]) -> String {
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).unwrap();
        mac.update(msg);
        hex(&mac.finalize().into_bytes())
    }

    #[test]
    fn hmac_rfc4231() {
        // Test case 1.
        assert_eq!(
            hmac_sha256(&[0x0b; 20], b"Hi There"),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        // Test case 2.
        assert_eq!(
            hmac_sha256(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: key longer than a block.
        assert_eq!(
            hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            ),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    /// Pins the wire format: these proofs were computed independently
    /// (Python's `hmac` over the documented message layout) and match what
    /// the earlier in-tree SHA-256 produced.
    #[test]
    fn proof_wire_format_is_pinned() {
        let k = Key::from_bytes(vec![1u8; 32]).unwrap();
        let (s, r) = ([1u8; 16], [2u8; 16]);
        assert_eq!(
            hex(&proof(&k, Role::Sender, &s, &r, 7, 0)),
            "44fa2cfef597706771d27d4076548438635c8f506cef46b95967e40315e4743e"
        );
        assert_eq!(
            hex(&proof(&k, Role::Receiver, &s, &r, 7, 0)),
            "313a285a3218a1a3439d3c5caf5594485f8a2dc86314f4c77fb8e60bd2ed1289"
        );
    }

    #[test]
    fn proofs_differ_by_role_and_key() {
        let k1 = Key::from_bytes(vec![1u8; 32]).unwrap();
        let k2 = Key::from_bytes(vec![2u8; 32]).unwrap();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let s = proof(&k1, Role::Sender, &a, &b, 7, 0);
        assert!(proof_matches(&k1, Role::Sender, &a, &b, 7, 0, &s));
        assert!(!proof_matches(&k1, Role::Receiver, &a, &b, 7, 0, &s));
        assert!(!proof_matches(&k2, Role::Sender, &a, &b, 7, 0, &s));
        assert!(!proof_matches(&k1, Role::Sender, &a, &b, 7, 1, &s));
        assert!(!proof_matches(&k1, Role::Sender, &a, &b, 7, 0, &s[..31]));
        assert!(!proof_matches(&k1, Role::Sender, &a, &b, 7, 0, &[]));
        let mut flipped = s;
        flipped[31] ^= 1;
        assert!(!proof_matches(&k1, Role::Sender, &a, &b, 7, 0, &flipped));
        assert!(Key::from_bytes(vec![0u8; 8]).is_err());
    }
}
