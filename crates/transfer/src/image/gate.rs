//! The one decision between publishing a finished image and withdrawing it.
//!
//! A command that writes an image can be interrupted (Ctrl-C, `SIGTERM`) at any moment,
//! also while the image is being renamed into place. Its answer must match what is on disk:
//! "interrupted" only if the earlier file at `PATH` is untouched, "done" only if `PATH` is
//! this transfer's complete image. [`PublishGate`] makes the rename and the withdrawal
//! exclusive: whichever comes first wins, and the other learns which.

use std::sync::Mutex;

/// Shared between an [`ImageWriter`](super::ImageWriter) (its publishing rename) and whoever
/// may withdraw the image (a signal handler).
#[derive(Debug, Default)]
pub struct PublishGate {
    state: Mutex<GateState>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum GateState {
    #[default]
    Open,
    Published,
    Withdrawn,
}

impl PublishGate {
    /// A gate that allows one publication until withdrawn.
    pub fn new() -> PublishGate {
        PublishGate::default()
    }

    /// Withdraws the image: once this returns `true`, the writer never renames it into place.
    /// Returns `false` if the image was already published (the file at `PATH` is the
    /// finished image): the transfer's result is final.
    pub fn withdraw(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match *s {
            GateState::Published => false,
            GateState::Open | GateState::Withdrawn => {
                *s = GateState::Withdrawn;
                true
            }
        }
    }

    /// Whether the image was published.
    pub fn published(&self) -> bool {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) == GateState::Published
    }

    /// Runs `rename` unless the image was withdrawn, holding the gate meanwhile (a withdrawal
    /// waits for it). `Ok(false)`: withdrawn, `rename` not run. A failed `rename` leaves the
    /// gate open.
    pub(crate) fn publish<E>(&self, rename: impl FnOnce() -> Result<(), E>) -> Result<bool, E> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match *s {
            GateState::Withdrawn => Ok(false),
            GateState::Published => Ok(true),
            GateState::Open => {
                rename()?;
                *s = GateState::Published;
                Ok(true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_publish_and_withdraw_wins() {
        let g = PublishGate::new();
        assert_eq!(g.publish(|| Ok::<(), ()>(())), Ok(true));
        assert!(g.published());
        assert!(!g.withdraw(), "a published image cannot be withdrawn");

        let g = PublishGate::new();
        assert!(g.withdraw());
        let mut renamed = false;
        assert_eq!(
            g.publish(|| {
                renamed = true;
                Ok::<(), ()>(())
            }),
            Ok(false)
        );
        assert!(!renamed, "a withdrawn image is never renamed into place");
        assert!(!g.published());
    }

    #[test]
    fn a_failed_rename_leaves_the_gate_open() {
        let g = PublishGate::new();
        assert_eq!(g.publish(|| Err::<(), _>("EXDEV")), Err("EXDEV"));
        assert!(!g.published());
        assert!(g.withdraw());
    }
}
