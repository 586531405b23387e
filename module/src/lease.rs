//! Which worker holds the Consul watches. One worker per nginx instance polls Consul (not one per
//! worker, as nginx-upsync-module does); the others read its results from shared memory. The
//! lease lives in the shared zone: the leader's PID, the config generation it runs and a
//! heartbeat it refreshes on every tick. This module decides, from a snapshot of that lease,
//! what one worker should do on its tick; the FFI layer reads the lease, decides and writes the
//! result in one critical section under the zone's mutex, so two workers can never both take the
//! lease and pid, generation and heartbeat always change together.

/// A worker's snapshot of the lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// 0 when nobody holds it.
    pub leader_pid: i64,
    /// The config generation the leader runs.
    pub leader_generation: u64,
    /// Monotonic ms of the leader's last tick.
    pub heartbeat_ms: u64,
}

/// Facts about the worker making the decision.
#[derive(Clone, Copy, Debug)]
pub struct Me {
    pub pid: i64,
    /// The generation of the config this worker runs.
    pub generation: u64,
    /// The generation of the newest configuration that loaded completely (committed by the
    /// master once nginx initialised the whole cycle). A reload that fails leaves it as it was,
    /// so the running workers keep leading.
    pub current_generation: u64,
    /// nginx is shutting this worker down (`ngx_exiting`/`ngx_terminate`/`ngx_quit`).
    pub exiting: bool,
    pub now_ms: u64,
    /// Whether the leader's PID still exists (kill(pid, 0)); a crashed leader frees the lease at
    /// once instead of after the heartbeat timeout.
    pub leader_alive: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// I hold the lease and keep it: refresh the heartbeat, keep the watches running.
    Renew,
    /// I hold the lease but must give it up now (shutting down, or a reload made my config old):
    /// stop the watches, clear the lease.
    Release,
    /// Nobody valid holds the lease: take it.
    Acquire,
    /// Someone else leads (or I must not): only follow the shared slots.
    Follow,
}

/// A heartbeat older than this frees the lease (the leader is stuck or gone).
pub const LEASE_TIMEOUT_MS: u64 = 3_000;

pub fn decide(lease: Lease, me: Me) -> Decision {
    let eligible = !me.exiting && me.generation >= me.current_generation;
    if lease.leader_pid == me.pid {
        return if eligible { Decision::Renew } else { Decision::Release };
    }
    if !eligible {
        return Decision::Follow;
    }
    let vacant = lease.leader_pid == 0
        || !me.leader_alive
        || lease.leader_generation < me.current_generation
        || me.now_ms.saturating_sub(lease.heartbeat_ms) > LEASE_TIMEOUT_MS;
    if vacant {
        Decision::Acquire
    } else {
        Decision::Follow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Me {
        Me { pid: 10, generation: 2, current_generation: 2, exiting: false, now_ms: 10_000, leader_alive: true }
    }
    fn held_by(pid: i64, generation: u64, heartbeat_ms: u64) -> Lease {
        Lease { leader_pid: pid, leader_generation: generation, heartbeat_ms }
    }

    #[test]
    fn leader_renews_until_it_must_stop() {
        assert_eq!(decide(held_by(10, 2, 9_900), me()), Decision::Renew);
        assert_eq!(decide(held_by(10, 2, 9_900), Me { exiting: true, ..me() }), Decision::Release);
        // A reload loaded generation 3: the old worker gives the watches up at once.
        assert_eq!(decide(held_by(10, 2, 9_900), Me { current_generation: 3, ..me() }), Decision::Release);
    }

    #[test]
    fn followers_take_a_vacant_lease() {
        assert_eq!(decide(held_by(0, 0, 0), me()), Decision::Acquire);
        assert_eq!(decide(held_by(11, 2, 9_900), me()), Decision::Follow);
        assert_eq!(decide(held_by(11, 2, 9_900), Me { leader_alive: false, ..me() }), Decision::Acquire);
        assert_eq!(decide(held_by(11, 2, 10_000 - LEASE_TIMEOUT_MS - 1), me()), Decision::Acquire);
        assert_eq!(decide(held_by(11, 1, 9_999), me()), Decision::Acquire);
    }

    #[test]
    fn a_failed_reload_changes_nothing() {
        // The failed load took generation 3 but never committed it: the leader of generation 2
        // keeps renewing, and its followers keep following.
        assert_eq!(decide(held_by(10, 2, 9_900), Me { current_generation: 2, ..me() }), Decision::Renew);
        assert_eq!(decide(held_by(11, 2, 9_900), me()), Decision::Follow);
    }

    #[test]
    fn old_or_exiting_workers_never_lead() {
        assert_eq!(decide(held_by(0, 0, 0), Me { exiting: true, ..me() }), Decision::Follow);
        assert_eq!(decide(held_by(0, 0, 0), Me { generation: 1, ..me() }), Decision::Follow);
    }
}
