//! `GET /metrics` for Prometheus (the OpenMetrics text format, with `prometheus-client`):
//! per VM its state, CPU time (its vCPU threads and the whole VMM), memory against its
//! cgroup's limit, and its starts and crashes from the ledger; for the host the VMs by state,
//! open incidents, ledger rows and API answers by status. Values are read at each scrape
//! (the ledger's counts on a reader of their own), so nothing is kept between scrapes but the
//! API's answer counts.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use api::VmState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::supervisor::Supervisor;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabel {
    vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmStateLabels {
    vm: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DiskLabels {
    vm: String,
    /// Its place in the VM's definition, from 0.
    disk: String,
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NicLabels {
    vm: String,
    nic: String,
    tap: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    status: u16,
}

/// What the API answered, by status, since the daemon started.
#[derive(Default, Clone)]
pub struct ApiCounters(Family<StatusLabel, Counter>);

impl ApiCounters {
    pub fn answered(&self, status: u16) {
        self.0.get_or_create(&StatusLabel { status }).inc();
    }
}

type FloatCounter = Counter<f64, AtomicU64>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Clock ticks per second, for /proc's CPU times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// utime + stime, in ticks, of a /proc `stat` line (fields 14 and 15, after the name).
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after the name: field 3 (state) is index 0, so utime (14) is index 11.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// CPU seconds of a VMM: (its vCPU threads, the whole process).
fn vmm_cpu_seconds(pid: u32) -> Option<(f64, f64)> {
    let hz = ticks_per_second();
    let total = cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    let mut vcpus = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let dir = task.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.starts_with("vcpu") {
            vcpus += std::fs::read_to_string(dir.join("stat"))
                .ok()
                .and_then(|s| cpu_ticks(&s))
                .unwrap_or(0);
        }
    }
    Some((vcpus as f64 / hz, total as f64 / hz))
}

/// Rows of a VM that moved to a state, per (VM, state).
type StateCounts = Vec<(String, String, i64)>;

/// The ledger's rows, and starts and crashes per VM from its state rows.
fn ledger_counts(conn: &rusqlite::Connection) -> rusqlite::Result<(i64, StateCounts)> {
    let rows: i64 = conn.query_row("SELECT COUNT(*) FROM ledger", [], |r| r.get(0))?;
    let mut stmt = conn.prepare(
        "SELECT vm, to_state, COUNT(*) FROM ledger
         WHERE kind = 'state' AND vm IS NOT NULL AND to_state IN ('starting', 'crashed')
         GROUP BY vm, to_state",
    )?;
    let counts = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((rows, counts))
}

/// How long a VMM gets to report its devices' counters.
const DEVICE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Each running VM's device counters, asked of its VMM on its control socket (in parallel; a
/// VMM that does not answer in time, or an older one that does not know the request, is
/// left out).
async fn device_metrics(
    sup: &Supervisor,
    vms: &[crate::store::VmRow],
) -> Vec<(usize, api::control::VmmMetrics)> {
    let asks = vms
        .iter()
        .enumerate()
        .filter(|(_, v)| v.state.has_vmm())
        .map(|(i, v)| {
            let run_dir = sup.run_dir(&v.spec.name);
            async move {
                let asked = crate::vmm_process::control(&run_dir, &api::control::Request::Metrics);
                match tokio::time::timeout(DEVICE_TIMEOUT, asked).await {
                    Ok(Ok(api::control::Response::Metrics(m))) => Some((i, m)),
                    _ => None,
                }
            }
        });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// The metrics text, read now.
pub async fn render(sup: &std::sync::Arc<Supervisor>, api: &ApiCounters) -> Result<String, String> {
    let (vms, incidents) = sup
        .with_store(|s| -> crate::store::Result<_> { Ok((s.vms()?, s.open_incidents()?)) })
        .map_err(|e| e.to_string())?;
    let (ledger_rows, counts) = sup
        .with_reader(ledger_counts)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("counting the ledger: {e}"))?;

    let devices = device_metrics(sup, &vms).await;

    let mut registry = Registry::with_prefix("keel");
    register_devices(&mut registry, &vms, &devices);
    let state = Family::<VmStateLabels, Gauge>::default();
    let vcpu = Family::<VmLabel, FloatCounter>::default();
    let vmm_cpu = Family::<VmLabel, FloatCounter>::default();
    let memory = Family::<VmLabel, Gauge>::default();
    let memory_limit = Family::<VmLabel, Gauge>::default();
    let configured = Family::<VmLabel, FloatGauge>::default();
    let starts = Family::<VmLabel, Counter>::default();
    let crashes = Family::<VmLabel, Counter>::default();
    let by_state = Family::<StateLabel, Gauge>::default();
    let mut host_counts: BTreeMap<&str, i64> = [
        VmState::Stopped,
        VmState::Starting,
        VmState::Running,
        VmState::ShuttingDown,
        VmState::Crashed,
        VmState::Paused,
    ]
    .iter()
    .map(|s| (s.as_str(), 0))
    .collect();
    for vm in &vms {
        let name = vm.spec.name.clone();
        let label = VmLabel { vm: name.clone() };
        state
            .get_or_create(&VmStateLabels {
                vm: name.clone(),
                state: vm.state.as_str().into(),
            })
            .set(1);
        *host_counts.entry(vm.state.as_str()).or_insert(0) += 1;
        configured
            .get_or_create(&label)
            .set(vm.spec.memory_mib as f64 * 1024.0 * 1024.0);
        if let Some((vcpus, total)) = vm
            .pid
            .filter(|_| vm.state.has_vmm())
            .and_then(vmm_cpu_seconds)
        {
            vcpu.get_or_create(&label).inc_by(vcpus);
            vmm_cpu.get_or_create(&label).inc_by(total);
        }
        if let Some(usage) = vm.state.has_vmm().then(|| sup.usage(&name)).flatten() {
            if let Some(bytes) = usage.memory_bytes {
                memory.get_or_create(&label).set(bytes as i64);
            }
            if let Some(bytes) = usage.memory_limit_bytes {
                memory_limit.get_or_create(&label).set(bytes as i64);
            }
        }
    }
    for (vm, to, n) in counts {
        let family = if to == "crashed" { &crashes } else { &starts };
        family.get_or_create(&VmLabel { vm }).inc_by(n as u64);
    }
    for (s, n) in host_counts {
        by_state
            .get_or_create(&StateLabel { state: s.into() })
            .set(n);
    }
    let open_incidents = Gauge::<i64>::default();
    open_incidents.set(incidents.len() as i64);
    let rows = Gauge::<i64>::default();
    rows.set(ledger_rows);

    registry.register("vm_state", "1 for the state each VM is in", state);
    registry.register("vm_vcpu_seconds", "CPU time of the VM's vCPU threads", vcpu);
    registry.register(
        "vm_vmm_cpu_seconds",
        "CPU time of the VM's whole VMM process",
        vmm_cpu,
    );
    registry.register(
        "vm_memory_bytes",
        "Memory the VM's cgroup uses (guest pages touched, the VMM, its page cache)",
        memory,
    );
    registry.register(
        "vm_memory_limit_bytes",
        "The VM cgroup's memory limit (guest RAM plus the VMM's allowance)",
        memory_limit,
    );
    registry.register(
        "vm_configured_memory_bytes",
        "Guest RAM as defined",
        configured,
    );
    registry.register(
        "vm_starts",
        "Starts of the VM recorded in the ledger",
        starts,
    );
    registry.register(
        "vm_crashes",
        "Crashes of the VM (its VMM or guest ended it unasked) recorded in the ledger",
        crashes,
    );
    registry.register("host_vms", "VMs by state", by_state);
    registry.register(
        "host_open_incidents",
        "Incidents not acknowledged yet",
        open_incidents,
    );
    registry.register("ledger_rows", "Rows in the availability ledger", rows);
    registry.register(
        "api_requests",
        "API answers since the daemon started, by HTTP status",
        api.0.clone(),
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).map_err(|e| e.to_string())?;
    Ok(text)
}

/// One counter family per device figure, labelled by VM and device.
fn register_devices(
    registry: &mut Registry,
    vms: &[crate::store::VmRow],
    devices: &[(usize, api::control::VmmMetrics)],
) {
    type DiskFigure = (
        &'static str,
        &'static str,
        fn(&api::control::DiskMetrics) -> u64,
    );
    let disk_figures: [DiskFigure; 8] = [
        (
            "vm_disk_read_requests",
            "Read requests taken from the disk's ring",
            |d| d.read_requests,
        ),
        ("vm_disk_read_bytes", "Bytes the guest asked to read", |d| {
            d.read_bytes
        }),
        (
            "vm_disk_write_requests",
            "Write requests taken from the disk's ring",
            |d| d.write_requests,
        ),
        (
            "vm_disk_write_bytes",
            "Bytes the guest asked to write",
            |d| d.write_bytes,
        ),
        (
            "vm_disk_flush_requests",
            "Flush requests (each an fdatasync)",
            |d| d.flush_requests,
        ),
        (
            "vm_disk_other_requests",
            "Discard, write-zeroes, get-id and unsupported requests",
            |d| d.other_requests,
        ),
        (
            "vm_disk_failed_requests",
            "Requests answered with an error status",
            |d| d.failed_requests,
        ),
        (
            "vm_disk_throttled",
            "Times the disk's rate limiter made a request wait",
            |d| d.throttled,
        ),
    ];
    for (name, help, figure) in disk_figures {
        let family = Family::<DiskLabels, Counter>::default();
        for (i, m) in devices {
            let vm = &vms[*i].spec;
            for (n, d) in m.disks.iter().enumerate() {
                let labels = DiskLabels {
                    vm: vm.name.clone(),
                    disk: n.to_string(),
                    path: vm.disks.get(n).map(|s| s.path.clone()).unwrap_or_default(),
                };
                family.get_or_create(&labels).inc_by(figure(d));
            }
        }
        registry.register(name, help, family);
    }
    type NetFigure = (
        &'static str,
        &'static str,
        fn(&api::control::NetMetrics) -> u64,
    );
    let net_figures: [NetFigure; 7] = [
        ("vm_nic_tx_frames", "Frames the guest sent", |n| n.tx_frames),
        (
            "vm_nic_tx_bytes",
            "Bytes of the frames the guest sent",
            |n| n.tx_bytes,
        ),
        (
            "vm_nic_tx_dropped",
            "Frames the guest sent that the tap did not take",
            |n| n.tx_dropped,
        ),
        ("vm_nic_rx_frames", "Frames delivered to the guest", |n| {
            n.rx_frames
        }),
        (
            "vm_nic_rx_bytes",
            "Bytes of the frames delivered to the guest",
            |n| n.rx_bytes,
        ),
        (
            "vm_nic_rx_dropped",
            "Frames the tap could not give the guest",
            |n| n.rx_dropped,
        ),
        (
            "vm_nic_throttled",
            "Times the NIC's rate limiter made frames wait",
            |n| n.throttled,
        ),
    ];
    for (name, help, figure) in net_figures {
        let family = Family::<NicLabels, Counter>::default();
        for (i, m) in devices {
            let vm = &vms[*i].spec;
            for (n, counters) in m.nets.iter().enumerate() {
                let labels = NicLabels {
                    vm: vm.name.clone(),
                    nic: n.to_string(),
                    tap: vm.nets.get(n).map(|s| s.tap.clone()).unwrap_or_default(),
                };
                family.get_or_create(&labels).inc_by(figure(counters));
            }
        }
        registry.register(name, help, family);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_are_read_after_the_name() {
        // A thread name with spaces and parentheses cannot shift the fields.
        let stat = "42 (vcpu 0) (x)) S 1 42 42 0 -1 4194560 100 0 0 0 250 30 0 0 20 0 3 0 99 0 0";
        assert_eq!(cpu_ticks(stat), Some(280));
        assert_eq!(cpu_ticks("garbage"), None);
    }
}
