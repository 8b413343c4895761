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
mod tests {
    use super::*;

    fn nz(n: u64) -> NonZeroU64 {
        NonZeroU64::new(n).expect("test values are nonzero")
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn ns(n: u64) -> Duration {
        Duration::from_nanos(n)
    }

    fn limiter_at(config: &str, now: Instant) -> RateLimiter {
        let config: RateLimitConfig = config.parse().expect("valid test config");
        let mut limiter = RateLimiter::new(&config).expect("timerfd");
        (limiter.bytes, limiter.ops) = config.buckets_at(now);
        limiter
    }

    fn parse_err(spec: &str) -> String {
        spec.parse::<RateLimitConfig>()
            .expect_err("spec should be rejected")
            .to_string()
    }

    #[test]
    fn fresh_bucket_is_full_then_empty() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new_at(nz(1000), nz(10), t0);
        assert!(bucket.consume_at(10, t0));
        assert!(!bucket.consume_at(1, t0));
        assert!(bucket.consume_at(0, t0));
    }

    #[test]
    fn refill_is_rate_times_elapsed() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new_at(nz(1000), nz(100), t0);
        assert!(bucket.consume_at(100, t0));
        assert!(!bucket.consume_at(1, t0 + ns(999_999)));
        assert!(bucket.consume_at(1, t0 + ms(1)));
        assert!(!bucket.consume_at(1, t0 + ms(1)));
        assert!(bucket.consume_at(50, t0 + ms(51)));
        assert!(!bucket.consume_at(1, t0 + ms(51)));
    }

    #[test]
    fn fractions_of_a_token_are_kept_across_refills() {
        let t0 = Instant::now();
        // 3 tokens/s: one token every 333_333_333.33 ns, never a whole number of ns.
        // Capacity 2, so that the step that completes a token never spills over capacity 1.
        let mut bucket = TokenBucket::new_at(nz(3), nz(2), t0);
        assert!(bucket.consume_at(2, t0));
        let mut now = t0;
        let mut passed = 0;
        // Refill every 10 µs for 10 s: each refill gains 3e-5 of a token.
        for _ in 0..1_000_000 {
            now += Duration::from_micros(10);
            if bucket.consume_at(1, now) {
                passed += 1;
            }
        }
        assert_eq!(passed, 30);
    }

    #[test]
    fn refill_stops_at_capacity() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new_at(nz(1000), nz(50), t0);
        assert!(bucket.consume_at(50, t0));
        let later = t0 + Duration::from_secs(3600);
        assert!(bucket.consume_at(50, later));
        assert!(!bucket.consume_at(1, later));
    }

    #[test]
    fn refused_request_takes_nothing() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new_at(nz(1000), nz(10), t0);
        assert!(bucket.consume_at(7, t0));
        assert!(!bucket.consume_at(4, t0));
        assert!(bucket.consume_at(3, t0));
    }

    #[test]
    fn clock_going_backwards_adds_nothing() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut bucket = TokenBucket::new_at(nz(1000), nz(10), t0);
        assert!(bucket.consume_at(10, t0));
        assert!(!bucket.consume_at(1, t0 - Duration::from_secs(5)));
        assert!(!bucket.consume_at(1, t0));
        assert!(bucket.consume_at(1, t0 + ms(1)));
    }

    #[test]
    fn oversize_request_passes_on_a_full_bucket_and_leaves_debt() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new_at(nz(1000), nz(100), t0);
        assert!(bucket.consume_at(250, t0));
        // 150 tokens of debt: nothing passes until it is repaid and one more token gained.
        assert_eq!(bucket.time_until_available_at(1, t0), ms(151));
        assert!(!bucket.consume_at(1, t0 + ms(150)));
        assert!(bucket.consume_at(1, t0 + ms(151)));
    }

    #[test]
    fn oversize_request_waits_for_a_full_bucket() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new_at(nz(1000), nz(100), t0);
        assert!(bucket.consume_at(40, t0));
        assert!(!bucket.consume_at(1000, t0));
        assert_eq!(bucket.time_until_available_at(1000, t0), ms(40));
        assert!(!bucket.consume_at(1000, t0 + ms(39)));
        assert!(bucket.consume_at(1000, t0 + ms(40)));
    }

    #[test]
    fn time_until_available_rounds_up() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new_at(nz(3), nz(3), t0);
        assert_eq!(bucket.time_until_available_at(3, t0), Duration::ZERO);
        assert!(bucket.consume_at(3, t0));
        // One token takes 333_333_333.3 ns: waiting 333_333_333 would be a fraction short.
        let wait = bucket.time_until_available_at(1, t0);
        assert_eq!(wait, ns(333_333_334));
        assert!(!bucket.consume_at(1, t0 + wait - ns(1)));
        assert!(bucket.consume_at(1, t0 + wait));
        assert_eq!(bucket.time_until_available_at(0, t0), Duration::ZERO);
    }

    #[test]
    fn one_hour_at_1000_ops_per_second_allows_3_6_million_ops() {
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs(3600);

        // Retrying exactly when told to, as a device woken by the timer does.
        let mut bucket = TokenBucket::new_at(nz(1000), nz(1), t0);
        let mut now = t0;
        let mut passed: u64 = 0;
        while now <= end {
            if bucket.consume_at(1, now) {
                passed += 1;
            } else {
                now += bucket.time_until_available_at(1, now);
            }
        }
        // The bucket starts with 1 token, then gains 3.6 M over the hour.
        assert!(passed.abs_diff(3_600_001) <= 1, "{passed} ops passed");

        // Retrying at ragged 0.7 ms steps that never line up with whole tokens; a capacity of 2
        // keeps any step's refill from spilling over.
        let mut bucket = TokenBucket::new_at(nz(1000), nz(2), t0);
        let mut now = t0;
        let mut passed: u64 = 0;
        while now <= end {
            while bucket.consume_at(1, now) {
                passed += 1;
            }
            now += ns(700_001);
        }
        assert!(passed.abs_diff(3_600_002) <= 1, "{passed} ops passed");
    }

    #[test]
    fn one_hour_of_bytes_at_an_odd_rate_is_exact() {
        let t0 = Instant::now();
        let rate = 12_345_679;
        let mut bucket = TokenBucket::new_at(nz(rate), nz(65_536), t0);
        let mut now = t0;
        let mut passed: u64 = 0;
        let end = t0 + Duration::from_secs(3600);
        while now < end {
            while bucket.consume_at(4096, now) {
                passed += 4096;
            }
            // Gains ~9.6 KB a step: never enough to spill over the 64 KiB capacity.
            now += ns(777_777);
        }
        let expected = rate * 3600 + 65_536;
        assert!(passed <= expected, "{passed} bytes passed");
        assert!(expected - passed < 4096 * 2, "{passed} bytes passed");
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new_at(nz(u64::MAX), nz(u64::MAX), t0);
        assert!(bucket.consume_at(u64::MAX, t0));
        assert!(bucket.consume_at(u64::MAX, t0 + Duration::from_secs(1)));
        let far = t0 + Duration::from_secs(100 * 365 * 24 * 3600);
        assert!(bucket.consume_at(u64::MAX, far));

        let mut slow = TokenBucket::new_at(nz(1), nz(1), t0);
        assert!(slow.consume_at(u64::MAX, t0));
        // Debt of ~1.8e19 s at 1 token/s: saturates instead of overflowing.
        assert_eq!(slow.time_until_available_at(1, t0).as_secs(), u64::MAX);
    }

    #[test]
    fn unlimited_limiter_never_blocks() {
        let mut limiter = RateLimiter::new(&RateLimitConfig::default()).expect("timerfd");
        assert!(limiter.is_unlimited());
        for _ in 0..1000 {
            assert!(limiter.consume(u64::MAX, u64::MAX));
        }
        assert!(!limiter.is_blocked());
        assert!(!limiter.timer.is_armed().expect("timerfd_gettime"));
        assert!(limiter.as_raw_fd() >= 0);
    }

    #[test]
    fn consume_is_all_or_nothing_across_both_buckets() {
        let t0 = Instant::now();
        let mut limiter = limiter_at("bw=1000,bw_burst=1000,iops=10,iops_burst=2", t0);
        assert!(limiter.consume_at(100, 1, t0));
        assert!(limiter.consume_at(100, 1, t0));
        // Bytes are there, ops are not: the bytes must stay in their bucket.
        assert!(!limiter.consume_at(100, 1, t0));
        assert!(limiter.is_blocked());
        limiter.blocked = false;
        assert!(limiter.consume_at(800, 0, t0));

        // 100 ms later: 1 op and 100 bytes gained. Ops are there, bytes are not: the op must stay.
        let later = t0 + ms(100);
        assert!(!limiter.consume_at(101, 1, later));
        limiter.blocked = false;
        assert!(limiter.consume_at(100, 1, later));
        assert!(!limiter.take_both(0, 1, later));
        assert!(!limiter.take_both(1, 0, later));
        assert!(limiter.take_both(0, 0, later));
    }

    #[test]
    fn zero_bytes_pass_a_bytes_bucket_in_debt() {
        let t0 = Instant::now();
        let mut limiter = limiter_at("bw=1000,bw_burst=1000,iops=1000", t0);
        assert!(limiter.consume_at(5000, 1, t0));
        // A flush carries no data: only its op counts.
        assert!(limiter.consume_at(0, 1, t0));
        assert!(!limiter.consume_at(1, 1, t0));
    }

    #[test]
    fn refusal_blocks_until_the_timer_event() {
        let t0 = Instant::now();
        let mut limiter = limiter_at("iops=10,iops_burst=1", t0);
        assert!(limiter.consume_at(0, 1, t0));
        assert!(!limiter.consume_at(0, 1, t0));
        assert!(limiter.is_blocked());
        assert!(limiter.timer.is_armed().expect("timerfd_gettime"));
        // Blocked: refused without looking at buckets, whatever the time.
        assert!(!limiter.consume(0, 1));
        limiter.event_handler().expect("read timerfd");
        assert!(!limiter.is_blocked());
        assert!(limiter.consume_at(0, 1, t0 + ms(100)));
    }

    #[test]
    fn timer_is_armed_for_the_slower_bucket() {
        let t0 = Instant::now();
        let mut limiter = limiter_at("bw=1M,bw_burst=64K,iops=100,iops_burst=4", t0);
        assert!(limiter.consume_at(60_000, 1, t0));
        // 4000 bytes and 3 ops left. 8000 bytes need 4 ms more; the op is there: bytes decide.
        assert!(!limiter.take_both(8000, 1, t0));
        assert_eq!(limiter.wait_for(8000, 1), ms(4));
        // Both oversize: bytes need a full bucket (60 ms), ops a full bucket (10 ms).
        assert!(!limiter.take_both(100_000, 5, t0));
        assert_eq!(limiter.wait_for(100_000, 5), ms(60));
        assert!(limiter.consume_at(0, 3, t0));
        // Bytes are free, one op takes 10 ms: ops decide.
        assert_eq!(limiter.wait_for(0, 1), ms(10));
        assert!(!limiter.consume_at(0, 1, t0));
        assert!(limiter.timer.is_armed().expect("timerfd_gettime"));
    }

    #[test]
    fn huge_wait_still_arms_the_timer() {
        let t0 = Instant::now();
        let mut limiter = limiter_at("iops=1,iops_burst=1", t0);
        assert!(limiter.consume_at(0, u64::MAX, t0));
        // Debt of ~1.8e19 s: the timer is armed for a day rather than refused by the kernel.
        assert!(!limiter.consume_at(0, 1, t0));
        assert!(limiter.is_blocked());
        assert!(limiter.timer.is_armed().expect("timerfd_gettime"));
    }

    #[test]
    fn spurious_timer_event_does_not_block_the_loop() {
        let mut limiter = RateLimiter::new(&"iops=5".parse().expect("config")).expect("timerfd");
        limiter
            .event_handler()
            .expect("nothing to read is not an error");
        assert!(!limiter.is_blocked());
    }

    #[test]
    fn timer_fires_in_real_time() {
        let mut limiter =
            RateLimiter::new(&"iops=100,iops_burst=1".parse().expect("config")).expect("timerfd");
        assert!(limiter.consume(0, 1));
        assert!(!limiter.consume(0, 1));
        let mut pollfd = libc::pollfd {
            fd: limiter.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, and poll writes only its revents.
        let ready = unsafe { libc::poll(&mut pollfd, 1, 5_000) };
        assert_eq!(ready, 1, "timer did not fire within 5 s");
        limiter.event_handler().expect("read timerfd");
        assert!(!limiter.is_blocked());
        assert!(limiter.consume(0, 1));
    }

    #[test]
    fn parses_plain_and_suffixed_amounts() {
        let config: RateLimitConfig = "bw=10M,bw_burst=1Mi,iops=2K,iops_burst=100"
            .parse()
            .expect("valid");
        assert_eq!(config.bytes_per_sec, Some(nz(10_000_000)));
        assert_eq!(config.bytes_burst, Some(nz(1 << 20)));
        assert_eq!(config.ops_per_sec, Some(nz(2000)));
        assert_eq!(config.ops_burst, Some(nz(100)));

        let amounts = [
            ("7", 7),
            ("1k", 1_000),
            ("1K", 1_000),
            ("1G", 1_000_000_000),
            ("2T", 2_000_000_000_000),
            ("3Ki", 3 << 10),
            ("1Gi", 1 << 30),
            ("1Ti", 1 << 40),
            ("18446744073709551615", u64::MAX),
        ];
        for (value, expected) in amounts {
            let mut config = RateLimitConfig::default();
            assert!(config.parse_option("bw", value).expect(value));
            assert_eq!(config.bytes_per_sec, Some(nz(expected)), "bw={value}");
        }
    }

    #[test]
    fn default_burst_is_one_second_of_rate() {
        let config: RateLimitConfig = "bw=50M,iops=1000".parse().expect("valid");
        let (bytes, ops) = config.buckets_at(Instant::now());
        assert_eq!(bytes.expect("bytes").capacity(), 50_000_000);
        assert_eq!(ops.expect("ops").capacity(), 1000);
        assert!(RateLimitConfig::default().is_unlimited());
        assert!(!config.is_unlimited());
    }

    #[test]
    fn parse_option_leaves_other_keys_to_the_caller() {
        let mut config = RateLimitConfig::default();
        assert!(!config
            .parse_option("path", "/tmp/disk.img")
            .expect("not ours"));
        assert!(!config.parse_option("readonly", "on").expect("not ours"));
        assert!(config.parse_option("iops", "1000").expect("ours"));
        assert_eq!(config.ops_per_sec, Some(nz(1000)));
        assert_eq!(RateLimitConfig::KEYS.len(), 4);
    }

    #[test]
    fn parse_errors_say_what_was_expected() {
        assert_eq!(
            parse_err("bw=abc"),
            "bw=abc: expected a number of bytes per second, e.g. 50M"
        );
        assert_eq!(
            parse_err("iops=many"),
            "iops=many: expected a number of operations per second, e.g. 1000"
        );
        assert_eq!(
            parse_err("bw_burst=x"),
            "bw_burst=x: expected a number of bytes, e.g. 4M"
        );
        assert_eq!(
            parse_err("iops_burst="),
            "iops_burst=: expected a number of operations, e.g. 100"
        );
        for bad in [
            "bw=1.5M", "bw=-1", "bw=10X", "bw=10MB", "bw=M", "bw= 10", "bw=10mi",
        ] {
            assert!(
                parse_err(bad).contains("expected a number of bytes per second"),
                "{bad}"
            );
        }
        assert_eq!(
            parse_err("bw=0"),
            "bw=0: must be more than 0 (leave bw= out for no limit)"
        );
        assert_eq!(
            parse_err("iops=0K"),
            "iops=0K: must be more than 0 (leave iops= out for no limit)"
        );
        assert!(parse_err("bw=18446744073709551616").contains("too large"));
        assert!(parse_err("bw=20000000T").contains("too large"));
        assert_eq!(parse_err("bw=1M,bw=2M"), "bw= is given more than once");
        assert_eq!(
            parse_err("bw_burst=1M"),
            "bw_burst= needs bw= as well (a burst alone sets no limit)"
        );
        assert_eq!(
            parse_err("iops_burst=10,bw=1M"),
            "iops_burst= needs iops= as well (a burst alone sets no limit)"
        );
        assert!(parse_err("bw").contains("expected key=value"));
        assert!(parse_err("speed=1M").contains("unknown rate-limit option 'speed'"));
    }

    #[test]
    fn limiter_rejects_an_invalid_config() {
        let config = RateLimitConfig {
            ops_burst: Some(nz(5)),
            ..Default::default()
        };
        let err = RateLimiter::new(&config).expect_err("burst without rate");
        assert!(err.to_string().contains("iops_burst= needs iops="));
    }
}
