//! The sender's half of the handshake (drawn in the protocol module):
//! HELLO, CHALLENGE, AUTH, WELCOME.

use std::time::Duration;

use super::conn::Connection;
use crate::auth::{self, Key, Role};
use crate::error::TransferError;
use crate::protocol::{
    Auth, Challenge, ErrorFrame, FrameKind, FrameReader, FrameWriter, Header, Hello, Welcome,
    error_code,
};

/// Runs the sender's half of the handshake on one connection; a receiver silent for `timeout`
/// fails it with [`TransferError::Stalled`].
pub(super) fn sender_handshake(
    conn: &mut Connection,
    hello: &Hello,
    key: Option<&Key>,
    timeout: Duration,
) -> Result<(), TransferError> {
    let result = handshake_steps(conn, hello, key, timeout);
    result.map_err(|e| e.or_stalled("the handshake with", || conn.peer(), timeout))
}

fn handshake_steps(
    conn: &mut Connection,
    hello: &Hello,
    key: Option<&Key>,
    timeout: Duration,
) -> Result<(), TransferError> {
    conn.set_read_timeout(Some(timeout))
        .map_err(TransferError::io("setting a socket timeout"))?;
    conn.set_write_timeout(Some(timeout))
        .map_err(TransferError::io("setting a socket timeout"))?;
    let mut w = FrameWriter::new(&*conn);
    w.write_preamble()
        .map_err(TransferError::io("sending the handshake"))?;
    w.send(hello)
        .map_err(TransferError::io("sending the handshake"))?;
    let mut r = FrameReader::new(&*conn);
    r.read_preamble()?;
    let mut p = Vec::new();
    let h = r.read_frame(&mut p)?;
    rejected(&h, &p)?;
    let challenge: Challenge = h.decode(&p)?;
    let receiver_nonce = challenge.nonce;
    if challenge.key_required && key.is_none() {
        // Answer anyway so the receiver reports a sender without a key rather
        // than a cut stream.
        let _ = w.send(&Auth { mac: None });
        return Err(TransferError::AuthRequired {
            receiver: conn.peer(),
        });
    }
    let mac = key.map(|k| {
        auth::proof(
            k,
            Role::Sender,
            &hello.nonce,
            &receiver_nonce,
            hello.session,
            hello.stream_index,
        )
    });
    w.send(&Auth { mac })
        .map_err(TransferError::io("sending the handshake"))?;
    let h = r.read_frame(&mut p)?;
    rejected(&h, &p).map_err(|e| match e {
        // The answer to a key: the receiver did not take it.
        TransferError::PeerRejected { code, message } if code == error_code::AUTH => {
            TransferError::KeyRefused {
                receiver: conn.peer(),
                message,
            }
        }
        TransferError::PeerRejected { code, .. } if code == error_code::BUSY => {
            TransferError::ReceiverBusy {
                receiver: conn.peer(),
            }
        }
        e => e,
    })?;
    let their = h.decode::<Welcome>(&p)?.mac;
    if let Some(k) = key {
        let proven = their.is_some_and(|m| {
            auth::proof_matches(
                k,
                Role::Receiver,
                &hello.nonce,
                &receiver_nonce,
                hello.session,
                hello.stream_index,
                &m,
            )
        });
        if !proven {
            return Err(TransferError::AuthFailed { peer: conn.peer() });
        }
    }
    conn.set_read_timeout(None)
        .map_err(TransferError::io("setting a socket timeout"))?;
    conn.set_write_timeout(None)
        .map_err(TransferError::io("setting a socket timeout"))?;
    Ok(())
}

/// Turns an ERROR frame into [`TransferError::PeerRejected`].
fn rejected(h: &Header, p: &[u8]) -> Result<(), TransferError> {
    if h.kind == FrameKind::Error {
        let e: ErrorFrame = h.decode(p)?;
        return Err(TransferError::PeerRejected {
            code: e.code,
            message: e.message.into_owned(),
        });
    }
    Ok(())
}
