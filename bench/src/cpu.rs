//! The whole machine's CPU time over a scenario, from `/proc/stat`: how busy it was, and
//! how much the hypervisor took for other guests (steal). On a shared virtual machine
//! steal is one reason two runs of the same build differ, here by up to half
//! (BENCHMARKS.md, the eleventh refresh).

/// Clock ticks of all cores, summed since boot.
#[derive(Debug, Clone, Copy)]
pub struct CpuTimes {
    busy: u64,
    idle: u64,
    steal: u64,
}

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
    fn a_line_that_is_not_the_aggregate_is_refused() {
        assert!(parse("cpu0 1 2 3 4 5 6 7 8").is_none());
        assert!(parse("cpu 1 2 3").is_none());
    }
}
