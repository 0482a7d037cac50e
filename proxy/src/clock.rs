//! Time, passed in. The judgment and the control plane never read the system
//! clock themselves: they ask a [`Clock`], so unit tests and the detection
//! bench run them on simulated time.

use std::fmt::Debug;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// Where the request path and the control plane get the time.
pub trait Clock: Send + Sync + Debug {
    /// Monotonic time since a base of the clock's choosing; what evidence
    /// windows count in.
    fn now(&self) -> Duration;
    /// Wall-clock time, for timestamps people read (`/status`, logs).
    fn wall(&self) -> SystemTime;
}

/// The real clock.
#[derive(Debug)]
pub struct SystemClock {
    epoch: Instant,
}

impl SystemClock {
    pub fn new() -> Self {
        SystemClock {
            epoch: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to: for tests and simulations.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<Duration>,
    wall_base: SystemTime,
}

impl ManualClock {
    /// Starts at 0, with wall-clock time `wall_base` at that instant.
    pub fn new(wall_base: SystemTime) -> Self {
        ManualClock {
            now: Mutex::new(Duration::ZERO),
            wall_base,
        }
    }

    pub fn advance(&self, by: Duration) {
        *self.now.lock().expect("clock lock") += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        *self.now.lock().expect("clock lock")
    }

    fn wall(&self) -> SystemTime {
        self.wall_base + self.now()
    }
}
