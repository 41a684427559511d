//! The whole machine's CPU time over a scenario, from `/proc/stat`: how busy it was, and
//! how much the hypervisor took for other guests (steal). On a shared virtual machine
//! steal is one reason two runs of the same build differ, here by up to half
//! (docs/benchmarks-history.md, the eleventh refresh).

/// Clock ticks of all cores, summed since boot.
#[derive(Debug, Clone, Copy)]
pub struct CpuTimes {
    busy: u64,
    idle: u64,
    steal: u64,
}

/// `/proc/stat` counts in USER_HZ, which Linux fixes at 100 for user space on every
/// architecture (`sysconf(_SC_CLK_TCK)`).
const TICKS_PER_SECOND: f64 = 100.0;

impl CpuTimes {
    /// Now; `None` where `/proc/stat` cannot be read (not Linux).
    pub fn now() -> Option<CpuTimes> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        parse(stat.lines().next()?)
    }

    /// From `self` to `later`, as "busy B %, idle I %, stolen S %" of all cores' time.
    pub fn share_until(&self, later: &CpuTimes) -> Option<String> {
        let busy = later.busy.checked_sub(self.busy)?;
        let idle = later.idle.checked_sub(self.idle)?;
        let steal = later.steal.checked_sub(self.steal)?;
        let total = busy + idle + steal;
        if total == 0 {
            return None;
        }
        let percent = |ticks: u64| ticks as f64 * 100.0 / total as f64;
        Some(format!(
            "busy {:.0} %, idle {:.0} %, stolen by the hypervisor {:.0} %",
            percent(busy),
            percent(idle),
            percent(steal)
        ))
    }

    /// The CPU time every process on the machine spent busy from `self` to `later`, in
    /// microseconds per `units` (events drained, say). Time the hypervisor stole is not
    /// counted, so this is the work done, which moves less than the wall time between
    /// a fast and a slow hour. Resolution: one tick (10 ms) over the whole span.
    pub fn busy_us_per(&self, later: &CpuTimes, units: u64) -> Option<f64> {
        let busy = later.busy.checked_sub(self.busy)?;
        if units == 0 {
            return None;
        }
        Some(busy as f64 / TICKS_PER_SECOND * 1e6 / units as f64)
    }
}

/// The aggregate `cpu` line: user nice system idle iowait irq softirq steal (guest time
/// is already counted in user).
fn parse(line: &str) -> Option<CpuTimes> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = ticks.try_into().ok()?;
    Some(CpuTimes {
        busy: user + nice + system + irq + softirq,
        idle: idle + iowait,
        steal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_split_all_ticks_into_busy_idle_and_stolen() {
        let before = parse("cpu  100 0 50 800 50 0 0 0 0 0").unwrap();
        // busy +200 (user 150, system 50), idle +100 (iowait 50 of it), steal +100.
        let after = parse("cpu  250 0 100 850 100 0 0 100 0 0").unwrap();
        assert_eq!(
            before.share_until(&after).as_deref(),
            Some("busy 50 %, idle 25 %, stolen by the hypervisor 25 %")
        );
    }

    #[test]
    fn busy_time_is_counted_per_unit_without_idle_or_steal() {
        let before = parse("cpu  100 0 50 800 50 0 0 0 0 0").unwrap();
        // busy +200 ticks = 2 s, over 1,000 units: 2,000 µs each.
        let after = parse("cpu  250 0 100 850 100 0 0 100 0 0").unwrap();
        assert_eq!(before.busy_us_per(&after, 1_000), Some(2_000.0));
        assert_eq!(before.busy_us_per(&after, 0), None);
        assert_eq!(after.busy_us_per(&before, 1_000), None);
    }

    #[test]
    fn a_line_that_is_not_the_aggregate_is_refused() {
        assert!(parse("cpu0 1 2 3 4 5 6 7 8").is_none());
        assert!(parse("cpu 1 2 3").is_none());
    }
}
