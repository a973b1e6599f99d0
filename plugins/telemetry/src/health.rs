//! Robot health read from /proc and /sys, named as node_exporter names it where it has a name.
//! Each reader takes the root directories, so tests run them on fixture trees; a file that is
//! missing (no battery, no hwmon) simply yields no samples.

use std::path::Path;

/// One metric sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
    /// Cumulative counter (recorded as an absolute value) rather than a gauge.
    pub counter: bool,
}

fn gauge(name: &'static str, labels: Vec<(&'static str, String)>, value: f64) -> Sample {
    Sample {
        name,
        labels,
        value,
        counter: false,
    }
}

fn counter(name: &'static str, labels: Vec<(&'static str, String)>, value: f64) -> Sample {
    Sample {
        name,
        labels,
        value,
        counter: true,
    }
}

/// HELP text for a family this module produces.
pub fn help(name: &str) -> &'static str {
    match name {
        "node_cpu_seconds_total" => "Seconds the CPUs spent in each mode.",
        "node_load1" => "1-minute load average.",
        "node_load5" => "5-minute load average.",
        "node_load15" => "15-minute load average.",
        "node_memory_MemTotal_bytes" => "Memory information field MemTotal_bytes.",
        "node_memory_MemAvailable_bytes" => "Memory information field MemAvailable_bytes.",
        "node_filesystem_avail_bytes" => "Filesystem space available to non-root users in bytes.",
        "node_filesystem_size_bytes" => "Filesystem size in bytes.",
        "node_thermal_zone_temp" => "Zone temperature in Celsius.",
        "node_hwmon_temp_celsius" => "Hardware monitor for temperature (input).",
        "node_power_supply_capacity" => "Battery capacity in percent.",
        "node_power_supply_info" => "Power supply status, as a label.",
        "node_network_receive_bytes_total" => "Network device statistic receive_bytes.",
        "node_network_transmit_bytes_total" => "Network device statistic transmit_bytes.",
        "process_resident_memory_bytes" => "Resident memory size of the Myelin node in bytes.",
        "process_threads" => "Threads of the Myelin node.",
        "process_open_fds" => "Open file descriptors of the Myelin node.",
        _ => "Robot health.",
    }
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// `node_cpu_seconds_total{cpu,mode}` from `<proc>/stat`; `ticks` is USER_HZ.
pub fn cpu(proc_root: &Path, ticks: f64) -> Vec<Sample> {
    const MODES: [&str; 8] = [
        "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
    ];
    let Some(text) = read(&proc_root.join("stat")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(cpu) = fields.next().and_then(|c| c.strip_prefix("cpu")) else {
            continue;
        };
        if cpu.is_empty() {
            continue; // the aggregate line; Prometheus sums per-CPU series itself
        }
        for (mode, v) in MODES.iter().zip(fields) {
            if let Ok(v) = v.parse::<f64>() {
                out.push(counter(
                    "node_cpu_seconds_total",
                    vec![("cpu", cpu.to_string()), ("mode", mode.to_string())],
                    v / ticks,
                ));
            }
        }
    }
    out
}

/// `node_load1`, `node_load5`, `node_load15` from `<proc>/loadavg`.
pub fn load(proc_root: &Path) -> Vec<Sample> {
    let Some(text) = read(&proc_root.join("loadavg")) else {
        return Vec::new();
    };
    let names = ["node_load1", "node_load5", "node_load15"];
    names
        .iter()
        .zip(text.split_whitespace())
        .filter_map(|(n, v)| v.parse().ok().map(|v| gauge(n, vec![], v)))
        .collect()
}

/// `node_memory_MemTotal_bytes` and `node_memory_MemAvailable_bytes` from `<proc>/meminfo`.
pub fn memory(proc_root: &Path) -> Vec<Sample> {
    let Some(text) = read(&proc_root.join("meminfo")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines() {
        let (key, rest) = line.split_once(':').unwrap_or(("", ""));
        let name = match key {
            "MemTotal" => "node_memory_MemTotal_bytes",
            "MemAvailable" => "node_memory_MemAvailable_bytes",
            _ => continue,
        };
        if let Some(kib) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            out.push(gauge(name, vec![], kib * 1024.0));
        }
    }
    out
}

/// `node_network_{receive,transmit}_bytes_total{device}` from `<proc>/net/dev`.
pub fn network(proc_root: &Path) -> Vec<Sample> {
    let Some(text) = read(&proc_root.join("net/dev")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines().skip(2) {
        let Some((dev, rest)) = line.split_once(':') else {
            continue;
        };
        let f: Vec<f64> = rest
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        if f.len() < 9 {
            continue;
        }
        let device = vec![("device", dev.trim().to_string())];
        out.push(counter(
            "node_network_receive_bytes_total",
            device.clone(),
            f[0],
        ));
        out.push(counter("node_network_transmit_bytes_total", device, f[8]));
    }
    out
}

/// `node_thermal_zone_temp{zone,type}` (°C) from `<sys>/class/thermal/thermal_zone*`: how
/// Jetson boards expose their CPU, GPU and board sensors.
pub fn thermal(sys_root: &Path) -> Vec<Sample> {
    let Ok(entries) = std::fs::read_dir(sys_root.join("class/thermal")) else {
        return Vec::new();
    };
    let mut out: Vec<Sample> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let zone = name.strip_prefix("thermal_zone")?.to_string();
            let milli: f64 = read(&e.path().join("temp"))?.trim().parse().ok()?;
            let kind = read(&e.path().join("type"))
                .map(|t| t.trim().to_string())
                .unwrap_or_default();
            Some(gauge(
                "node_thermal_zone_temp",
                vec![("type", kind), ("zone", zone)],
                milli / 1000.0,
            ))
        })
        .collect();
    out.sort_by(|a, b| a.labels.cmp(&b.labels));
    out
}

/// `node_hwmon_temp_celsius{chip,sensor}` from `<sys>/class/hwmon/hwmon*/temp*_input`.
pub fn hwmon(sys_root: &Path) -> Vec<Sample> {
    let Ok(chips) = std::fs::read_dir(sys_root.join("class/hwmon")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for chip in chips.flatten() {
        let chip_name = read(&chip.path().join("name"))
            .map(|n| n.trim().to_string())
            .unwrap_or_else(|| chip.file_name().to_string_lossy().into_owned());
        let Ok(files) = std::fs::read_dir(chip.path()) else {
            continue;
        };
        for f in files.flatten() {
            let file = f.file_name().to_string_lossy().into_owned();
            let Some(sensor) = file
                .strip_suffix("_input")
                .filter(|s| s.starts_with("temp"))
            else {
                continue;
            };
            if let Some(milli) = read(&f.path()).and_then(|t| t.trim().parse::<f64>().ok()) {
                out.push(gauge(
                    "node_hwmon_temp_celsius",
                    vec![("chip", chip_name.clone()), ("sensor", sensor.to_string())],
                    milli / 1000.0,
                ));
            }
        }
    }
    out.sort_by(|a, b| a.labels.cmp(&b.labels));
    out
}

/// Batteries and chargers from `<sys>/class/power_supply`: `node_power_supply_capacity` (0–100)
/// and `node_power_supply_info{power_supply,status}`. No power supply, no samples.
pub fn power(sys_root: &Path) -> Vec<Sample> {
    let Ok(supplies) = std::fs::read_dir(sys_root.join("class/power_supply")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for s in supplies.flatten() {
        let name = s.file_name().to_string_lossy().into_owned();
        if let Some(cap) =
            read(&s.path().join("capacity")).and_then(|c| c.trim().parse::<f64>().ok())
        {
            out.push(gauge(
                "node_power_supply_capacity",
                vec![("power_supply", name.clone())],
                cap,
            ));
        }
        if let Some(status) = read(&s.path().join("status")) {
            out.push(gauge(
                "node_power_supply_info",
                vec![
                    ("power_supply", name.clone()),
                    ("status", status.trim().to_string()),
                ],
                1.0,
            ));
        }
    }
    out
}

/// The node process's own resident memory, threads and open descriptors (`process_*`).
pub fn process(proc_root: &Path, pid: u32) -> Vec<Sample> {
    let dir = proc_root.join(pid.to_string());
    let mut out = Vec::new();
    if let Some(status) = read(&dir.join("status")) {
        for line in status.lines() {
            let (key, rest) = line.split_once(':').unwrap_or(("", ""));
            let value = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok());
            match (key, value) {
                ("VmRSS", Some(kib)) => {
                    out.push(gauge("process_resident_memory_bytes", vec![], kib * 1024.0))
                }
                ("Threads", Some(n)) => out.push(gauge("process_threads", vec![], n)),
                _ => {}
            }
        }
    }
    if let Ok(fds) = std::fs::read_dir(dir.join("fd")) {
        out.push(gauge("process_open_fds", vec![], fds.count() as f64));
    }
    out
}

/// `node_filesystem_{avail,size}_bytes{mountpoint}` for the configured mount points.
pub fn filesystems(mounts: &[String]) -> Vec<Sample> {
    let mut out = Vec::new();
    for m in mounts {
        let Ok(st) = rustix::fs::statvfs(m.as_str()) else {
            continue;
        };
        let frsize = st.f_frsize as f64;
        let labels = vec![("mountpoint", m.clone())];
        out.push(gauge(
            "node_filesystem_avail_bytes",
            labels.clone(),
            st.f_bavail as f64 * frsize,
        ));
        out.push(gauge(
            "node_filesystem_size_bytes",
            labels,
            st.f_blocks as f64 * frsize,
        ));
    }
    out
}

/// A robot's health as the fleet page shows it: a few figures, each absent when the machine
/// has no such sensor.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    pub kind: &'static str,
    /// Busy share of every CPU since the previous summary (absent on the first).
    pub cpu_percent: Option<f64>,
    pub load1: Option<f64>,
    pub memory_used_percent: Option<f64>,
    /// The hottest thermal zone or hwmon sensor.
    pub temperature_c: Option<f64>,
    /// The lowest battery's capacity.
    pub battery_percent: Option<f64>,
    /// A battery reports "Charging" or "Full".
    pub charging: Option<bool>,
}

/// Busy and total CPU seconds over every CPU, kept between summaries for `cpu_percent`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuTimes {
    busy: f64,
    total: f64,
}

/// The summary of `samples`, and the CPU times to pass to the next call.
pub fn summarize(samples: &[Sample], previous: Option<CpuTimes>) -> (Summary, Option<CpuTimes>) {
    let value = |name: &str| samples.iter().find(|s| s.name == name).map(|s| s.value);
    let label = |s: &Sample, key: &str| {
        s.labels
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    };
    let cpu: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == "node_cpu_seconds_total")
        .collect();
    let now = (!cpu.is_empty()).then(|| {
        let total: f64 = cpu.iter().map(|s| s.value).sum();
        let idle: f64 = cpu
            .iter()
            .filter(|s| matches!(label(s, "mode").as_deref(), Some("idle" | "iowait")))
            .map(|s| s.value)
            .sum();
        CpuTimes {
            busy: total - idle,
            total,
        }
    });
    let cpu_percent = match (previous, now) {
        (Some(p), Some(n)) if n.total > p.total => {
            Some(((n.busy - p.busy) / (n.total - p.total) * 100.0).clamp(0.0, 100.0))
        }
        _ => None,
    };
    let memory_used_percent = match (
        value("node_memory_MemTotal_bytes"),
        value("node_memory_MemAvailable_bytes"),
    ) {
        (Some(total), Some(available)) if total > 0.0 => {
            Some(((total - available) / total * 100.0).clamp(0.0, 100.0))
        }
        _ => None,
    };
    let temperature_c = samples
        .iter()
        .filter(|s| matches!(s.name, "node_thermal_zone_temp" | "node_hwmon_temp_celsius"))
        .map(|s| s.value)
        .reduce(f64::max);
    let battery_percent = samples
        .iter()
        .filter(|s| s.name == "node_power_supply_capacity")
        .map(|s| s.value)
        .reduce(f64::min);
    let charging = samples
        .iter()
        .filter(|s| s.name == "node_power_supply_info")
        .filter_map(|s| label(s, "status"))
        .filter(|status| status != "Unknown")
        .map(|status| status == "Charging" || status == "Full")
        .reduce(|a, b| a || b);
    let summary = Summary {
        kind: "health",
        cpu_percent,
        load1: value("node_load1"),
        memory_used_percent,
        temperature_c,
        battery_percent,
        charging,
    };
    (summary, now.or(previous))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v))
            })
            .map(|s| s.value)
    }

    #[test]
    fn proc_files_parse_with_node_exporter_names() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        write(p, "stat", "cpu  10 0 20 300 5 0 1 0 0 0\ncpu0 100 2 200 3000 50 0 10 0 0 0\ncpu1 1 2 3 4 5 6 7 8 0 0\nintr 5\n");
        write(p, "loadavg", "0.52 0.31 0.20 2/345 6789\n");
        write(
            p,
            "meminfo",
            "MemTotal:        8000000 kB\nMemFree:  1 kB\nMemAvailable:    4000000 kB\n",
        );
        write(p, "net/dev", "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo: 100 1 0 0 0 0 0 0 200 2 0 0 0 0 0 0\n  eth0: 12345 10 0 0 0 0 0 0 67890 20 0 0 0 0 0 0\n");
        write(
            p,
            "42/status",
            "Name:\tmyelin\nVmRSS:\t   20480 kB\nThreads:\t7\n",
        );
        fs::create_dir_all(p.join("42/fd")).unwrap();
        for i in 0..3 {
            fs::write(p.join(format!("42/fd/{i}")), "").unwrap();
        }
        let cpu = cpu(p, 100.0);
        assert_eq!(
            value(
                &cpu,
                "node_cpu_seconds_total",
                &[("cpu", "0"), ("mode", "idle")]
            ),
            Some(30.0)
        );
        assert_eq!(
            value(
                &cpu,
                "node_cpu_seconds_total",
                &[("cpu", "1"), ("mode", "steal")]
            ),
            Some(0.08)
        );
        assert!(cpu.iter().all(|s| s.counter), "CPU seconds are counters");
        assert_eq!(
            cpu.len(),
            16,
            "8 modes for each of 2 CPUs, no aggregate line"
        );
        assert_eq!(value(&load(p), "node_load5", &[]), Some(0.31));
        assert_eq!(
            value(&memory(p), "node_memory_MemAvailable_bytes", &[]),
            Some(4_096_000_000.0)
        );
        let net = network(p);
        assert_eq!(
            value(
                &net,
                "node_network_transmit_bytes_total",
                &[("device", "eth0")]
            ),
            Some(67890.0)
        );
        assert_eq!(
            value(
                &net,
                "node_network_receive_bytes_total",
                &[("device", "lo")]
            ),
            Some(100.0)
        );
        let me = process(p, 42);
        assert_eq!(
            value(&me, "process_resident_memory_bytes", &[]),
            Some(20_971_520.0)
        );
        assert_eq!(value(&me, "process_threads", &[]), Some(7.0));
        assert_eq!(value(&me, "process_open_fds", &[]), Some(3.0));
    }

    #[test]
    fn jetson_thermal_zones_and_hwmon() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path();
        // A Jetson Orin exposes its sensors as thermal zones with these types.
        for (i, (kind, milli)) in [
            ("CPU-therm", "45500"),
            ("GPU-therm", "43000"),
            ("SOC0-therm", "44250"),
            ("tj-therm", "46000"),
        ]
        .iter()
        .enumerate()
        {
            write(
                s,
                &format!("class/thermal/thermal_zone{i}/type"),
                &format!("{kind}\n"),
            );
            write(
                s,
                &format!("class/thermal/thermal_zone{i}/temp"),
                &format!("{milli}\n"),
            );
        }
        write(s, "class/thermal/cooling_device0/type", "pwm-fan\n");
        write(s, "class/hwmon/hwmon0/name", "nvme\n");
        write(s, "class/hwmon/hwmon0/temp1_input", "38850\n");
        write(s, "class/hwmon/hwmon0/temp1_label", "Composite\n");
        let t = thermal(s);
        assert_eq!(t.len(), 4, "cooling devices are not zones");
        assert_eq!(
            value(
                &t,
                "node_thermal_zone_temp",
                &[("type", "GPU-therm"), ("zone", "1")]
            ),
            Some(43.0)
        );
        assert_eq!(
            value(
                &hwmon(s),
                "node_hwmon_temp_celsius",
                &[("chip", "nvme"), ("sensor", "temp1")]
            ),
            Some(38.85)
        );
    }

    #[test]
    fn battery_present_or_missing() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path();
        assert!(
            power(s).is_empty(),
            "no power_supply directory: no samples, no error"
        );
        write(s, "class/power_supply/AC/online", "1\n");
        assert!(
            power(s).is_empty(),
            "a charger without capacity or status adds nothing"
        );
        write(s, "class/power_supply/BAT0/capacity", "87\n");
        write(s, "class/power_supply/BAT0/status", "Discharging\n");
        let p = power(s);
        assert_eq!(
            value(
                &p,
                "node_power_supply_capacity",
                &[("power_supply", "BAT0")]
            ),
            Some(87.0)
        );
        assert_eq!(
            value(&p, "node_power_supply_info", &[("status", "Discharging")]),
            Some(1.0)
        );
    }

    #[test]
    fn missing_and_garbled_files_yield_nothing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        assert!(cpu(p, 100.0).is_empty() && load(p).is_empty() && memory(p).is_empty());
        assert!(network(p).is_empty() && thermal(p).is_empty() && hwmon(p).is_empty());
        write(p, "loadavg", "garbage\n");
        write(p, "net/dev", "a\nb\nbroken line without colon\n  x: 1 2\n");
        assert!(load(p).is_empty() && network(p).is_empty());
        assert!(filesystems(&["/definitely/not/mounted".into()]).is_empty());
        assert_eq!(filesystems(&["/".into()]).len(), 2);
    }

    #[test]
    fn summary_figures_come_from_the_samples() {
        let cpu = |cpu: &str, user: f64, idle: f64| {
            vec![
                counter(
                    "node_cpu_seconds_total",
                    vec![("cpu", cpu.into()), ("mode", "user".into())],
                    user,
                ),
                counter(
                    "node_cpu_seconds_total",
                    vec![("cpu", cpu.into()), ("mode", "idle".into())],
                    idle,
                ),
            ]
        };
        let mut first = [cpu("0", 10.0, 90.0), cpu("1", 10.0, 90.0)].concat();
        first.extend([
            gauge("node_load1", vec![], 0.5),
            gauge("node_memory_MemTotal_bytes", vec![], 1000.0),
            gauge("node_memory_MemAvailable_bytes", vec![], 250.0),
            gauge("node_thermal_zone_temp", vec![("zone", "0".into())], 41.0),
            gauge("node_hwmon_temp_celsius", vec![("chip", "c".into())], 55.5),
            gauge(
                "node_power_supply_capacity",
                vec![("power_supply", "BAT0".into())],
                80.0,
            ),
            gauge(
                "node_power_supply_capacity",
                vec![("power_supply", "BAT1".into())],
                35.0,
            ),
            gauge(
                "node_power_supply_info",
                vec![
                    ("power_supply", "BAT0".into()),
                    ("status", "Discharging".into()),
                ],
                1.0,
            ),
        ]);
        let (s, times) = summarize(&first, None);
        assert_eq!(s.cpu_percent, None, "one sample has no rate");
        assert_eq!(
            (
                s.load1,
                s.memory_used_percent,
                s.temperature_c,
                s.battery_percent,
                s.charging
            ),
            (Some(0.5), Some(75.0), Some(55.5), Some(35.0), Some(false))
        );
        // 20 s later: 15 s more busy and 5 s more idle over both CPUs.
        let second = [cpu("0", 20.0, 90.0), cpu("1", 15.0, 95.0)].concat();
        let (s, _) = summarize(&second, times);
        assert_eq!(s.cpu_percent, Some(75.0));
        assert_eq!(
            (s.temperature_c, s.battery_percent, s.charging),
            (None, None, None)
        );
        assert_eq!(summarize(&[], times).0.cpu_percent, None);
    }
}
