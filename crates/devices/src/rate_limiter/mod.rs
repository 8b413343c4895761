//! I/O rate limiting shared by disks and NICs: a token bucket for bytes and one for operations,
//! each with a burst, checked together before a device serves a request.
//!
//! The model: a bucket gains `rate` tokens per second up to `capacity` (the burst) and starts
//! full. Refill is computed lazily from `Instant` (the monotonic clock) whenever the bucket is
//! used. The level is kept exactly, in units of 1/1e9 token, so no time or fraction is ever lost
//! and the long-run rate is exact.
//!
//! A request larger than a bucket's capacity could never fit, so it passes once the bucket is
//! full and leaves the bucket in debt: later requests wait until refill has paid the excess back.
//! The long-run rate still holds, and a large request is never split into parts.
//!
//! How a device on the event loop uses a [`RateLimiter`]:
//! 1. add its fd ([`AsRawFd`]) to the epoll set once;
//! 2. before serving a request, call [`RateLimiter::consume`]; on `false` leave the request
//!    where it is (no tokens were taken) and stop processing that queue;
//! 3. when the fd is readable, call [`RateLimiter::event_handler`] and retry the queue.
//!
//! While blocked the limiter refuses every request without looking at the clock: the timer is
//! armed for the moment the refused request fits, so retrying earlier would only burn CPU.

use std::io;
use std::num::NonZeroU64;
use std::os::unix::io::{AsRawFd, RawFd};
use std::str::FromStr;
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

const NANOS_PER_SEC: u128 = 1_000_000_000;
/// Longest the timer is armed for. A longer wait (a huge debt at a tiny rate) would be refused by
/// timerfd; firing early is harmless, as the retry re-arms the timer for the rest.
const MAX_TIMER_WAIT: Duration = Duration::from_secs(24 * 3600);

/// A rate-limit option that cannot be used, or a timer the limiter could not set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{key}={value}: expected a number of {unit}, e.g. {example}")]
    NotANumber {
        key: &'static str,
        value: String,
        unit: &'static str,
        example: &'static str,
    },
    #[error("{key}={value}: must be more than 0 (leave {key}= out for no limit)")]
    Zero { key: &'static str, value: String },
    #[error("{key}={value}: too large (at most {max})", max = u64::MAX)]
    TooLarge { key: &'static str, value: String },
    #[error("{key}= is given more than once")]
    Repeated { key: &'static str },
    #[error("{burst_key}= needs {rate_key}= as well (a burst alone sets no limit)")]
    BurstWithoutRate {
        burst_key: &'static str,
        rate_key: &'static str,
    },
    #[error("'{0}': expected key=value (bw=, bw_burst=, iops=, iops_burst=)")]
    NotKeyValue(String),
    #[error("unknown rate-limit option '{0}' (known: bw, bw_burst, iops, iops_burst)")]
    UnknownKey(String),
    #[error("rate limiter timer: cannot {action}: {source}")]
    Timer {
        action: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Tokens gained at a fixed rate up to a capacity, taken all-or-nothing.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_sec: u64,
    capacity: u64,
    /// Tokens × 1e9. Signed because an oversize request leaves the bucket in debt; exact so that
    /// refill never rounds time away.
    level_nanotokens: i128,
    last_refill: Instant,
}

impl TokenBucket {
    /// A full bucket gaining `rate_per_sec` tokens a second, holding at most `capacity`.
    pub fn new(rate_per_sec: NonZeroU64, capacity: NonZeroU64) -> Self {
        Self::new_at(rate_per_sec, capacity, Instant::now())
    }

    pub fn rate_per_sec(&self) -> u64 {
        self.rate_per_sec
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Takes `n` tokens if they are there, or none. `n` above the capacity passes when the
    /// bucket is full, leaving it in debt. `n == 0` always passes.
    pub fn consume(&mut self, n: u64) -> bool {
        self.consume_at(n, Instant::now())
    }

    /// How long until `consume(n)` would pass (zero if it would pass now).
    pub fn time_until_available(&mut self, n: u64) -> Duration {
        self.time_until_available_at(n, Instant::now())
    }

    fn new_at(rate_per_sec: NonZeroU64, capacity: NonZeroU64, now: Instant) -> Self {
        Self {
            rate_per_sec: rate_per_sec.get(),
            capacity: capacity.get(),
            level_nanotokens: nanotokens(capacity.get()),
            last_refill: now,
        }
    }

    fn consume_at(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        let fits = self.fits(n);
        if fits {
            self.take(n);
        }
        fits
    }

    fn time_until_available_at(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        self.wait_for(n)
    }

    fn refill(&mut self, now: Instant) {
        // Instants from tests may go backwards; treat that as no time passing.
        if now <= self.last_refill {
            return;
        }
        let elapsed_ns = now.duration_since(self.last_refill).as_nanos();
        let gained = elapsed_ns.saturating_mul(u128::from(self.rate_per_sec));
        let gained = i128::try_from(gained).unwrap_or(i128::MAX);
        self.level_nanotokens = self
            .level_nanotokens
            .saturating_add(gained)
            .min(nanotokens(self.capacity));
        self.last_refill = now;
    }

    /// Level needed for `n` to pass: `n`, or a full bucket for an oversize `n`.
    fn needed(&self, n: u64) -> i128 {
        nanotokens(n.min(self.capacity))
    }

    fn fits(&self, n: u64) -> bool {
        n == 0 || self.level_nanotokens >= self.needed(n)
    }

    fn take(&mut self, n: u64) {
        self.level_nanotokens = self.level_nanotokens.saturating_sub(nanotokens(n));
    }

    fn wait_for(&self, n: u64) -> Duration {
        if self.fits(n) {
            return Duration::ZERO;
        }
        // Positive: fits() was false.
        let deficit = self.needed(n).abs_diff(self.level_nanotokens);
        // Rounded up so that the wait never ends a nanosecond short of enough tokens.
        let nanos = deficit.div_ceil(u128::from(self.rate_per_sec));
        duration_from_nanos(nanos)
    }
}

fn nanotokens(tokens: u64) -> i128 {
    // At most u64::MAX × 1e9 < 2^94: always fits.
    i128::from(tokens) * NANOS_PER_SEC as i128
}

fn duration_from_nanos(nanos: u128) -> Duration {
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // Below 1e9: fits in u32.
    let subsec = (nanos % NANOS_PER_SEC) as u32;
    Duration::new(secs, subsec)
}

/// The limits a disk or NIC asks for; `None` means no limit on that resource.
///
/// Rates are in bytes (not bits) and operations per second. A burst is the bucket capacity; it
/// defaults to one second's worth of the rate. Zero is rejected: leave the option out instead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// `bw=`
    pub bytes_per_sec: Option<NonZeroU64>,
    /// `bw_burst=`
    pub bytes_burst: Option<NonZeroU64>,
    /// `iops=`
    pub ops_per_sec: Option<NonZeroU64>,
    /// `iops_burst=`
    pub ops_burst: Option<NonZeroU64>,
}

/// What one option key sets, and how to describe its value in an error.
struct OptionKind {
    key: &'static str,
    unit: &'static str,
    example: &'static str,
}

const BW: OptionKind = OptionKind {
    key: "bw",
    unit: "bytes per second",
    example: "50M",
};
const BW_BURST: OptionKind = OptionKind {
    key: "bw_burst",
    unit: "bytes",
    example: "4M",
};
const IOPS: OptionKind = OptionKind {
    key: "iops",
    unit: "operations per second",
    example: "1000",
};
const IOPS_BURST: OptionKind = OptionKind {
    key: "iops_burst",
    unit: "operations",
    example: "100",
};

impl RateLimitConfig {
    /// The option keys this config takes, for a caller's list of known options.
    pub const KEYS: [&'static str; 4] = ["bw", "bw_burst", "iops", "iops_burst"];

    /// Takes one `key=value` option of a `--disk` or `--net` list. `Ok(false)`: not a rate-limit
    /// key, the caller's own parser should handle it. Call [`Self::validate`] once all options
    /// are in.
    ///
    /// Values are whole numbers with an optional suffix: K, M, G, T are decimal (10^3, 10^6, ..;
    /// k is accepted for K) and Ki, Mi, Gi, Ti binary (2^10, 2^20, ..).
    pub fn parse_option(&mut self, key: &str, value: &str) -> Result<bool, Error> {
        let (kind, slot) = match key {
            "bw" => (&BW, &mut self.bytes_per_sec),
            "bw_burst" => (&BW_BURST, &mut self.bytes_burst),
            "iops" => (&IOPS, &mut self.ops_per_sec),
            "iops_burst" => (&IOPS_BURST, &mut self.ops_burst),
            _ => return Ok(false),
        };
        if slot.is_some() {
            return Err(Error::Repeated { key: kind.key });
        }
        *slot = Some(parse_amount(kind, value)?);
        Ok(true)
    }

    /// Checks what only the whole option list can show: a burst needs its rate.
    pub fn validate(&self) -> Result<(), Error> {
        if self.bytes_burst.is_some() && self.bytes_per_sec.is_none() {
            return Err(Error::BurstWithoutRate {
                burst_key: BW_BURST.key,
                rate_key: BW.key,
            });
        }
        if self.ops_burst.is_some() && self.ops_per_sec.is_none() {
            return Err(Error::BurstWithoutRate {
                burst_key: IOPS_BURST.key,
                rate_key: IOPS.key,
            });
        }
        Ok(())
    }

    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_sec.is_none() && self.ops_per_sec.is_none()
    }

    fn buckets_at(&self, now: Instant) -> (Option<TokenBucket>, Option<TokenBucket>) {
        let bucket = |rate: Option<NonZeroU64>, burst: Option<NonZeroU64>| {
            rate.map(|rate| TokenBucket::new_at(rate, burst.unwrap_or(rate), now))
        };
        (
            bucket(self.bytes_per_sec, self.bytes_burst),
            bucket(self.ops_per_sec, self.ops_burst),
        )
    }
}

/// A comma-separated list of rate-limit options alone, e.g. `bw=50M,iops=1000`.
impl FromStr for RateLimitConfig {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self, Error> {
        let mut config = Self::default();
        for part in spec.split(',').filter(|part| !part.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| Error::NotKeyValue(part.to_string()))?;
            if !config.parse_option(key, value)? {
                return Err(Error::UnknownKey(key.to_string()));
            }
        }
        config.validate()?;
        Ok(config)
    }
}

fn parse_amount(kind: &OptionKind, value: &str) -> Result<NonZeroU64, Error> {
    let not_a_number = || Error::NotANumber {
        key: kind.key,
        value: value.to_string(),
        unit: kind.unit,
        example: kind.example,
    };
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, suffix) = value.split_at(digits_end);
    if digits.is_empty() {
        return Err(not_a_number());
    }
    let multiplier: u64 = match suffix {
        "" => 1,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(not_a_number()),
    };
    let too_large = || Error::TooLarge {
        key: kind.key,
        value: value.to_string(),
    };
    // Only digits remain, so parsing can fail only by overflow.
    let base: u64 = digits.parse().map_err(|_| too_large())?;
    let amount = base.checked_mul(multiplier).ok_or_else(too_large)?;
    NonZeroU64::new(amount).ok_or_else(|| Error::Zero {
        key: kind.key,
        value: value.to_string(),
    })
}

/// A bytes bucket and an operations bucket checked together, and the timer that says when a
/// refused request would fit. With neither bucket, every request passes at the cost of two
/// branches: no clock read, no system call.
#[derive(Debug)]
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    /// Armed for when the last refused request fits; readable when it does.
    timer: TimerFd,
    blocked: bool,
}

impl RateLimiter {
    /// A limiter for `config`, which is validated first. Its timer fd exists even without
    /// limits, so that [`AsRawFd`] always gives a real fd; it simply never fires.
    pub fn new(config: &RateLimitConfig) -> Result<Self, Error> {
        config.validate()?;
        let (bytes, ops) = config.buckets_at(Instant::now());
        let timer = TimerFd::new().map_err(|e| Error::Timer {
            action: "create it",
            source: e.into(),
        })?;
        // The event loop reads the timer after epoll says it is readable, but a spurious or
        // stale wakeup must not stall the whole loop on a blocking read.
        set_nonblocking(timer.as_raw_fd()).map_err(|source| Error::Timer {
            action: "make it non-blocking",
            source,
        })?;
        Ok(Self {
            bytes,
            ops,
            timer,
            blocked: false,
        })
    }

    pub fn is_unlimited(&self) -> bool {
        self.bytes.is_none() && self.ops.is_none()
    }

    /// True from a refusal until [`Self::event_handler`] runs.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Takes `bytes` and `ops` tokens if both buckets have them, or nothing. On refusal the
    /// limiter is blocked and its timer armed for when this request would fit.
    pub fn consume(&mut self, bytes: u64, ops: u64) -> bool {
        if self.is_unlimited() {
            return true;
        }
        if self.blocked {
            return false;
        }
        self.consume_at(bytes, ops, Instant::now())
    }

    /// The device was reset: its old requests are gone, so is the debt they left. Buckets
    /// in debt are brought up to empty (never given tokens: a reset buys no burst), and the
    /// limiter is unblocked; the next request waits only for its own tokens.
    pub fn forgive_debt(&mut self) {
        for bucket in [&mut self.bytes, &mut self.ops].into_iter().flatten() {
            bucket.level_nanotokens = bucket.level_nanotokens.max(0);
        }
        if self.blocked {
            self.blocked = false;
            // Disarmed: a timer left to fire would only wake the device for nothing.
            let _ = self.timer.reset(Duration::ZERO, None);
        }
    }

    /// Call when the timer fd is readable: drains it and unblocks the limiter, after which the
    /// device should retry the requests it held back.
    pub fn event_handler(&mut self) -> Result<(), Error> {
        // Unblock whatever the read says: the next consume() re-arms the timer if still short.
        self.blocked = false;
        match self.timer.wait() {
            Ok(_) => Ok(()),
            Err(e) if e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(Error::Timer {
                action: "read it",
                source: e.into(),
            }),
        }
    }

    fn consume_at(&mut self, bytes: u64, ops: u64, now: Instant) -> bool {
        if self.take_both(bytes, ops, now) {
            return true;
        }
        // A zero duration would disarm the timer; refusal implies a wait of at least 1 ns anyway.
        let wait = self
            .wait_for(bytes, ops)
            .clamp(Duration::from_nanos(1), MAX_TIMER_WAIT);
        if self.timer.reset(wait, None).is_err() {
            // Without a timer nothing would ever unblock the device: let the request through
            // and charge it, so that the average rate still holds.
            self.force_take(bytes, ops);
            return true;
        }
        self.blocked = true;
        false
    }

    /// Refills both buckets to `now` and takes from both only if both have enough.
    fn take_both(&mut self, bytes: u64, ops: u64, now: Instant) -> bool {
        let mut fits = true;
        for (bucket, n) in [(&mut self.bytes, bytes), (&mut self.ops, ops)] {
            if let Some(bucket) = bucket {
                bucket.refill(now);
                fits &= bucket.fits(n);
            }
        }
        if fits {
            self.force_take(bytes, ops);
        }
        fits
    }

    /// Takes `bytes` and `ops` whether or not they are there (for work already done, like a
    /// received frame whose size was known only afterwards). If that leaves a bucket in
    /// debt, the limiter blocks until the debt is repaid.
    pub fn charge(&mut self, bytes: u64, ops: u64) {
        if self.is_unlimited() {
            return;
        }
        let now = Instant::now();
        for bucket in [&mut self.bytes, &mut self.ops].into_iter().flatten() {
            bucket.refill(now);
        }
        self.force_take(bytes, ops);
        let wait = self.wait_for(1, 1);
        if wait > Duration::ZERO
            && !self.blocked
            && self.timer.reset(wait.min(MAX_TIMER_WAIT), None).is_ok()
        {
            self.blocked = true;
        }
    }

    fn force_take(&mut self, bytes: u64, ops: u64) {
        if let Some(bucket) = &mut self.bytes {
            bucket.take(bytes);
        }
        if let Some(bucket) = &mut self.ops {
            bucket.take(ops);
        }
    }

    /// Time until both buckets can take the request, as of their last refill.
    fn wait_for(&self, bytes: u64, ops: u64) -> Duration {
        let bytes_wait = self
            .bytes
            .as_ref()
            .map_or(Duration::ZERO, |b| b.wait_for(bytes));
        let ops_wait = self
            .ops
            .as_ref()
            .map_or(Duration::ZERO, |b| b.wait_for(ops));
        bytes_wait.max(ops_wait)
    }
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL only reads the status flags of an fd this process owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL only changes the status flags of an fd this process owns.
    let ret = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
