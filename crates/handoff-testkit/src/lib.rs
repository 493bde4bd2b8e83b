//! The one place test timeouts come from.
//!
//! Tests wait for things other tasks and processes do: a controller's write, a server's reaper,
//! an API server's restart. On a busy 2-core machine (CI, or `scripts/stress-test.sh`, which runs
//! the suite beside `stress-ng --cpu 2`) those take several times longer than on an idle one. So
//! every wait here is generous by default and scales by `HANDOFF_TEST_TIMEOUT_SCALE` (a positive
//! number, default 1) for slower machines still. A generous wait costs nothing when the test
//! passes: it only decides how long a failing test takes to say so.
//!
//! Durations that are the *behaviour under test* (a memory-wait timeout of 300 ms, a TTL of 1 s)
//! are not waits and stay as they are.

use std::future::Future;
use std::time::Duration;

/// The variable that scales every wait.
pub const SCALE_VAR: &str = "HANDOFF_TEST_TIMEOUT_SCALE";

/// How long a test waits, by default, for something another task or process does.
pub const DEFAULT_PATIENCE: Duration = Duration::from_secs(120);

/// The factor from `HANDOFF_TEST_TIMEOUT_SCALE`, or 1.
///
/// # Panics
/// When the variable is set but is not a positive number: a typo should not silently become 1.
pub fn scale() -> f64 {
    match std::env::var(SCALE_VAR) {
        Err(_) => 1.0,
        Ok(text) => match text.trim().parse::<f64>() {
            Ok(factor) if factor.is_finite() && factor > 0.0 => factor,
            _ => panic!("{SCALE_VAR}={text:?}: expected a positive number such as 2 or 0.5"),
        },
    }
}

/// `base`, scaled.
pub fn scaled(base: Duration) -> Duration {
    base.mul_f64(scale())
}

/// The default wait, scaled.
pub fn patience() -> Duration {
    scaled(DEFAULT_PATIENCE)
}

/// Polls `check` until it returns `Some`, for up to [`patience`]; panics naming `what` after that.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(what, patience(), check).await
}

/// [`eventually`] with a wait of its own (already scaled by the caller, if it should be).
pub async fn eventually_within<T, F, Fut>(what: &str, wait: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll_until(wait, check).await {
        Some(value) => value,
        None => panic!(
            "timed out after {wait:?} waiting for {what} (raise {SCALE_VAR} on a slow machine)"
        ),
    }
}

/// Polls `check` until it returns `Some`, for up to `wait`; `None` after that, for a caller that
/// says more about the failure than [`eventually`] can.
pub async fn poll_until<T, F, Fut>(wait: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if started.elapsed() >= wait {
            return None;
        }
        tokio::time::sleep(pause).await;
        // Quick while things are quick, gentle on a loaded machine.
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Awaits `future` for up to [`patience`]; panics naming `what` after that.
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    let wait = patience();
    match tokio::time::timeout(wait, future).await {
        Ok(value) => value,
        Err(_) => panic!(
            "timed out after {wait:?} waiting for {what} (raise {SCALE_VAR} on a slow machine)"
        ),
    }
}

/// Blocking [`eventually`], for code outside a runtime (polls with `std::thread::sleep`).
pub fn eventually_blocking<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let wait = patience();
    let started = std::time::Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            started.elapsed() < wait,
            "timed out after {wait:?} waiting for {what} (raise {SCALE_VAR} on a slow machine)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn eventually_returns_the_first_value() {
        let mut n = 0;
        let got = eventually("the third poll", || {
            n += 1;
            let value = (n == 3).then_some(n);
            async move { value }
        })
        .await;
        assert_eq!(got, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "timed out")]
    async fn eventually_names_what_it_waited_for() {
        eventually_within("nothing", Duration::from_millis(30), || async {
            None::<()>
        })
        .await;
    }
}
