//! Rate limiter tests: synthetic instants for the arithmetic, one real timer.
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

#[test]
fn charge_takes_unconditionally_and_blocks_while_in_debt() {
    let config: RateLimitConfig = "iops=10".parse().unwrap();
    let mut limiter = RateLimiter::new(&config).unwrap();
    limiter.charge(0, 15);
    assert!(limiter.is_blocked(), "5 ops of debt");
    assert!(!limiter.consume(0, 1));
    let mut unlimited = RateLimiter::new(&RateLimitConfig::default()).unwrap();
    unlimited.charge(1 << 40, 1 << 40);
    assert!(!unlimited.is_blocked());
    assert!(unlimited.consume(1, 1));
}

#[test]
fn a_reset_forgives_debt_but_grants_no_burst() {
    let t0 = Instant::now();
    let mut limiter = limiter_at("bw=10M", t0);
    // A 2 GiB request once left the bucket 200 seconds in debt.
    limiter.charge(2 << 30, 1);
    assert!(limiter.is_blocked());
    limiter.forgive_debt();
    assert!(!limiter.is_blocked());
    let bytes = limiter.bytes.as_ref().expect("a bytes bucket");
    assert_eq!(bytes.level_nanotokens, 0, "at empty: no tokens given");
    // A 4 KiB request now waits for its own tokens only: 0.4 ms at 10 MB/s.
    assert!(
        limiter.wait_for(4096, 1) <= ms(1),
        "{:?}",
        limiter.wait_for(4096, 1)
    );
    // A bucket that was not in debt keeps what it had.
    let mut full = limiter_at("bw=10M", t0);
    full.forgive_debt();
    assert!(full.consume_at(4096, 1, t0));
}
