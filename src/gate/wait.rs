//! Pure decisions of a held build's wait: how long to pause between two `Acquire`s (with a
//! scheduler that predates `WaitForLease`), when and what to tell the member.

use std::fmt::Write as _;
use std::time::Duration;

/// The pause before the next `Acquire`: the scheduler's hint, kept within `[min, max]` so
/// that a freed slot is taken quickly and the scheduler is not hammered.
pub fn poll_delay(retry_after: Duration, min: Duration, max: Duration) -> Duration {
    retry_after.clamp(min, max)
}

/// Whether to show the queue position now: the first time, when it changed, or when the
/// last message is older than `every`.
pub fn should_show(
    last: Option<(u32, Duration)>,
    position: u32,
    now: Duration,
    every: Duration,
) -> bool {
    match last {
        None => true,
        Some((p, at)) => p != position || now.saturating_sub(at) >= every,
    }
}

/// What the member reads while waiting. Never starts with `# ` (a Nix 2.8 ssh-ng build
/// hook would take such a line on stderr for its own reply).
/// `estimate`: the scheduler's estimate of the time left, when it gives one.
pub fn waiting_text(
    host: &str,
    position: u32,
    waited: Duration,
    estimate: Option<Duration>,
    reason: &str,
) -> String {
    let mut s = format!(
        "nixdispatch-gate: waiting for a build slot on {host}: position {position} in the queue, waited {}s",
        waited.as_secs()
    );
    if let Some(e) = estimate.filter(|e| !e.is_zero()) {
        let _ = write!(s, ", about {}s to go", e.as_secs().max(1));
    }
    if !reason.is_empty() {
        s.push_str(" (");
        s.push_str(reason);
        s.push(')');
    }
    s
}

/// What the member reads once the slot is granted after a wait.
pub fn granted_text(host: &str, waited: Duration) -> String {
    format!(
        "nixdispatch-gate: build slot granted on {host} after {}s",
        waited.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scheduler's hint is honoured within the configured bounds.
    #[test]
    fn poll_delay_is_clamped() {
        let (min, max) = (Duration::from_millis(250), Duration::from_secs(2));
        assert_eq!(poll_delay(Duration::ZERO, min, max), min);
        assert_eq!(
            poll_delay(Duration::from_millis(700), min, max),
            Duration::from_millis(700)
        );
        assert_eq!(poll_delay(Duration::from_secs(60), min, max), max);
    }

    /// The position is shown first, on change, and again after `every`.
    #[test]
    fn position_is_shown_on_change_and_periodically() {
        let every = Duration::from_secs(30);
        let s = Duration::from_secs;
        assert!(should_show(None, 3, s(0), every));
        assert!(!should_show(Some((3, s(0))), 3, s(10), every));
        assert!(should_show(Some((3, s(0))), 2, s(10), every));
        assert!(should_show(Some((3, s(0))), 3, s(30), every));
    }

    /// Member-facing lines never look like a build hook's reply.
    #[test]
    fn texts_never_start_with_a_hash() {
        let t = waiting_text("b1", 2, Duration::from_secs(5), None, "all 2 slots busy");
        assert!(!t.starts_with('#'));
        assert!(t.contains("position 2") && t.contains("b1"), "{t}");
        let t = waiting_text("b1", 2, Duration::ZERO, Some(Duration::from_secs(90)), "");
        assert!(!t.starts_with('#'));
        assert!(t.contains("about 90s to go"), "{t}");
        assert!(!granted_text("b1", Duration::ZERO).starts_with('#'));
    }
}
