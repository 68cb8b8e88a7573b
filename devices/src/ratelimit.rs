//! Rate-limited logging for guest-triggered conditions: a guest can cause an unbounded number of
//! bad accesses, so each distinct condition is logged once, then only every 1024th repeat.

use std::collections::HashMap;
use std::sync::Mutex;

static SEEN: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);
/// Above this many distinct keys we stop tracking new ones (and stop logging them) so a guest
/// cannot grow our memory by probing many addresses.
const MAX_KEYS: usize = 4096;

/// Returns true if a message with this key should be logged now.
pub fn should_log(key: &str) -> bool {
    let mut guard = match SEEN.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    let map = guard.get_or_insert_with(HashMap::new);
    if let Some(n) = map.get_mut(key) {
        *n += 1;
        return *n % 1024 == 0;
    }
    if map.len() >= MAX_KEYS {
        return false;
    }
    map.insert(key.to_string(), 0);
    true
}

/// `warn!` at most once per distinct key (then every 1024th repeat).
#[macro_export]
macro_rules! warn_limited {
    ($key:expr, $($arg:tt)+) => {
        if $crate::ratelimit::should_log(&$key) {
            log::warn!($($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_first_then_suppresses() {
        assert!(should_log("ratelimit-test-a"));
        assert!(!should_log("ratelimit-test-a"));
        assert!(should_log("ratelimit-test-b"));
    }
}
