//! The frame kinds of the wire protocol and image format (see
//! [`crate::protocol`] for what each carries). A leaf: errors name frames by
//! these without depending on the protocol module.

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Sender's handshake.
    Hello = 1,
    /// Receiver's handshake and challenge.
    Challenge = 2,
    /// Sender's challenge response.
    Auth = 3,
    /// Receiver's acceptance.
    Welcome = 4,
    /// A round starts.
    RoundBegin = 5,
    /// Page contents.
    Pages = 6,
    /// Pages that are all zeros.
    Zero = 7,
    /// A round ends, with this connection's counts.
    RoundEnd = 8,
    /// No more rounds; carries the memory checksum.
    Finish = 9,
    /// Receiver's success acknowledgement.
    Done = 10,
    /// Either side's failure report.
    Error = 11,
    /// Image page index.
    Index = 12,
    /// Image completion marker.
    Trailer = 13,
    /// The source's state blob, after the last round.
    State = 14,
    /// Sender's confirmation that it accepted DONE in time.
    Commit = 15,
    /// Sender's round-trip probe between rounds.
    Ping = 16,
    /// Receiver's answer to PING.
    Pong = 17,
    /// The receiver's answer to a sender resuming a broken transfer.
    Resume = 18,
    /// A memory region added to the layout between rounds.
    Region = 19,
    /// Image only: the round that follows stands for every round before it
    /// (the image was compacted to the latest copy of each page).
    Compacted = 20,
    /// Between rounds: the memory that exists now; every page outside it was
    /// unmapped by the source and is dropped.
    Mapped = 21,
}

impl FrameKind {
    /// The kind for a header byte.
    pub fn from_u8(kind: u8) -> Option<FrameKind> {
        use FrameKind::*;
        Some(match kind {
            1 => Hello,
            2 => Challenge,
            3 => Auth,
            4 => Welcome,
            5 => RoundBegin,
            6 => Pages,
            7 => Zero,
            8 => RoundEnd,
            9 => Finish,
            10 => Done,
            11 => Error,
            12 => Index,
            13 => Trailer,
            14 => State,
            15 => Commit,
            16 => Ping,
            17 => Pong,
            18 => Resume,
            19 => Region,
            20 => Compacted,
            21 => Mapped,
            _ => return None,
        })
    }
}

impl std::fmt::Display for FrameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use FrameKind::*;
        f.write_str(match self {
            Hello => "HELLO",
            Challenge => "CHALLENGE",
            Auth => "AUTH",
            Welcome => "WELCOME",
            RoundBegin => "ROUND_BEGIN",
            Pages => "PAGES",
            Zero => "ZERO",
            RoundEnd => "ROUND_END",
            Finish => "FINISH",
            Done => "DONE",
            Error => "ERROR",
            Index => "INDEX",
            Trailer => "TRAILER",
            State => "STATE",
            Commit => "COMMIT",
            Ping => "PING",
            Pong => "PONG",
            Resume => "RESUME",
            Region => "REGION",
            Compacted => "COMPACTED",
            Mapped => "MAPPED",
        })
    }
}
