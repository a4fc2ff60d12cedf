//! What the privileged test files share: whether a test that needs root and `/dev/net/tun` may
//! skip when they are missing.
//!
//! Outside CI a developer without root may run the suite, so such a test prints why it skips and
//! passes. Under CI (`CI` set to a true value) or with `D7Q_REQUIRE_PRIVILEGED=1` — which
//! `scripts/test.sh` exports once it has checked root and `/dev/net/tun` — a missing prerequisite
//! fails the test instead: a green run must mean the tests ran. `D7Q_REQUIRE_PRIVILEGED=0` turns
//! the requirement off even under CI, for a job that runs unprivileged on purpose.

use d7q_netsim::netns;

/// The variable that, set to `1`, makes privileged tests fail instead of skipping.
pub const REQUIRE_VAR: &str = "D7Q_REQUIRE_PRIVILEGED";

/// True if the test `what` should return at once because this process cannot make namespaces
/// and TUN devices and may skip; panics with what is missing and the fix if it may not skip.
pub fn skip_unprivileged(what: &str) -> bool {
    let Err(why) = netns::privileged() else {
        return false;
    };
    let ci = std::env::var("CI").ok();
    let require = std::env::var(REQUIRE_VAR).ok();
    if required(ci.as_deref(), require.as_deref()) {
        panic!(
            "{what} needs root and /dev/net/tun, and this run requires them \
             (CI={ci:?}, {REQUIRE_VAR}={require:?}), but: {why}. \
             Run the tests as root with the tun module loaded, as scripts/test.sh does; \
             set {REQUIRE_VAR}=0 to let them skip instead."
        );
    }
    eprintln!(
        "skipping {what}: it needs root and /dev/net/tun ({why}); \
         under CI or with {REQUIRE_VAR}=1 this fails instead"
    );
    true
}

/// Whether a missing privilege fails the test, from the values of `CI` and [`REQUIRE_VAR`]:
/// the latter decides when set to a recognised value; otherwise any `CI` but an empty or false
/// one requires (CI systems spell it `true`, `1` or a name); neither set means skip.
pub fn required(ci: Option<&str>, require: Option<&str>) -> bool {
    let truth = |v: &str| match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" => Some(true),
        "0" | "false" | "no" | "" => Some(false),
        _ => None,
    };
    match require.and_then(truth) {
        Some(decided) => decided,
        None => ci.is_some_and(|v| truth(v) != Some(false)),
    }
}
