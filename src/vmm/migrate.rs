//! What the event loop does for a live migration (see `crate::migration`): start it, answer
//! the migration thread at the switch-over, let go of the host resources and take them
//! back when the migration fails.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use log::{error, info, warn};

use super::{ExitReason, Vmm};
use crate::api::Reply;
use crate::migration::send::{Job, ToMain, ToWorker};
use crate::migration::MigrateParams;
use crate::vstate::vcpu::VcpuHandle;

/// How long the switch-over waits for the migration thread's next step.
const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(90);

/// A migration under way.
pub struct Running {
    to_worker: Sender<ToWorker>,
    local: bool,
}

impl Vmm {
    /// Starts a migration the control socket asked for; the reply when it cannot start
    /// (else the migration thread answers on `progress`).
    pub(super) fn start_migration(
        &mut self,
        params: MigrateParams,
        progress: Option<UnixStream>,
    ) -> Reply {
        if let Err(e) = params.validate() {
            return Reply::error(400, e);
        }
        if self.migrating.is_some() {
            return Reply::error(409, "a migration is already under way");
        }
        if !self.no_persist.is_empty() {
            return Reply::error(
                409,
                format!(
                    "this VM cannot be migrated: ferrovm cannot save the state of {}",
                    self.no_persist.join(", ")
                ),
            );
        }
        let memfd = if self.mem_shared {
            crate::vstate::memory::guest_memfd(&self.mem).and_then(|f| f.try_clone().ok())
        } else {
            None
        };
        if params.local && memfd.is_none() {
            return Reply::error(
                409,
                "local migration hands guest memory over as a memfd: start the VM with \
                 --memory-shared (a VM restored from a snapshot maps its memory from the \
                 snapshot file and cannot)",
            );
        }
        if !params.local {
            if let Some((nic, tap)) = self.taps.iter().find(|(_, t)| !t.multi_queue()) {
                return Reply::error(
                    409,
                    format!(
                        "{nic}'s TAP {0} is single-queue, so this process cannot let go of \
                         it for the destination to open: make it multi-queue (`ip tuntap add \
                         {0} mode tap multi_queue`; the TAPs ferrovm creates are), or migrate \
                         with local=true to hand it over",
                        tap.name()
                    ),
                );
            }
        }
        let Some(worker) = self.migration.as_ref() else {
            return Reply::error(500, "the migration thread is not running");
        };
        let (tx, rx) = mpsc::channel();
        let job = Job {
            params: params.clone(),
            progress,
            mem: self.mem.clone(),
            vm: self.vm.shared_fd(),
            config: self.config.clone(),
            memory: crate::persist::memory_layout(&self.mem),
            memfd,
            from_main: rx,
        };
        if let Err(e) = worker.submit(job) {
            return Reply::error(500, e);
        }
        info!(
            "Migrating to {} ({})",
            params.to,
            if params.local { "local" } else { "copy" }
        );
        self.migrating = Some(Running {
            to_worker: tx,
            local: params.local,
        });
        Reply::streamed()
    }

    /// Handles what the migration thread says; an exit reason when the VM has moved.
    pub(super) fn poll_migration(&mut self, vcpus: &[VcpuHandle]) -> Option<ExitReason> {
        let event = self.migration.as_ref()?.try_event()?;
        match event {
            ToMain::Converged => self.switchover(vcpus),
            ToMain::Failed(why) => {
                // Failed before the switch-over: the guest never stopped.
                warn!("Migration failed, the VM runs on here: {why}");
                self.migrating = None;
                None
            }
            other => {
                error!("The migration thread said {other:?} out of turn");
                None
            }
        }
    }

    /// Pauses the VM, hands its state over and waits (blocking the event loop, so no
    /// device touches guest memory) until the destination runs it or the migration fails.
    fn switchover(&mut self, vcpus: &[VcpuHandle]) -> Option<ExitReason> {
        let running = self.migrating.take()?;
        let was_paused = self.run_state.paused();
        let paused_at = Instant::now();
        let abort = |why: String| {
            let _ = running.to_worker.send(ToWorker::Abort(why));
        };
        if !was_paused {
            if let Err(e) = self.pause(vcpus) {
                abort(e);
                return self.after_failure(was_paused, false, false);
            }
        }
        match self.capture(vcpus) {
            Ok(snap) => {
                let _ = running
                    .to_worker
                    .send(ToWorker::State(Box::new(snap), paused_at));
            }
            Err(e) => {
                abort(super::error_chain(&e));
                return self.after_failure(was_paused, false, false);
            }
        }
        let mut released = false;
        loop {
            let worker = self.migration.as_ref()?;
            match worker.event_timeout(SWITCHOVER_TIMEOUT) {
                Ok(ToMain::Release) => {
                    let fds = self.release_host(running.local);
                    released = true;
                    let _ = running.to_worker.send(ToWorker::Released(fds));
                }
                Ok(ToMain::Done) => {
                    info!(
                        "Migrated: the VM runs at the destination (paused here {} ms)",
                        paused_at.elapsed().as_millis()
                    );
                    return Some(ExitReason::Migrated);
                }
                Ok(ToMain::Failed(why)) => {
                    warn!("Migration failed, the VM runs on here: {why}");
                    return self.after_failure(was_paused, released, running.local);
                }
                Ok(ToMain::Converged) => {}
                Err(RecvTimeoutError::Timeout) => {
                    warn!(
                        "The migration thread did not finish the switch-over within \
                         {SWITCHOVER_TIMEOUT:?}: cancelling it"
                    );
                    worker.cancel();
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return self.after_failure(was_paused, released, running.local);
                }
            }
        }
    }

    /// Lets go of what the destination opens: every writable disk is flushed, and each TAP's
    /// queue detached (copy mode) or its fd handed over (local mode).
    fn release_host(&self, local: bool) -> Vec<(String, OwnedFd)> {
        for (path, f) in &self.disk_files {
            if let Err(e) = f.sync_data() {
                warn!("Failed to flush {} for the migration: {e}", path.display());
            }
        }
        let mut fds = Vec::new();
        for (nic, tap) in &self.taps {
            if local {
                match tap.try_clone() {
                    Ok(t) => fds.push((nic.clone(), OwnedFd::from(t.into_file()))),
                    Err(e) => warn!("Failed to duplicate {nic}'s TAP fd: {e}"),
                }
            } else if let Err(e) = tap.set_queue_attached(false) {
                warn!("Failed to detach {nic}'s TAP queue: {e}");
            }
        }
        fds
    }

    /// The migration failed: the TAPs' queues come back, and the guest runs again unless it
    /// was paused before.
    fn after_failure(
        &mut self,
        was_paused: bool,
        released: bool,
        local: bool,
    ) -> Option<ExitReason> {
        if released && !local {
            for (nic, tap) in &self.taps {
                if let Err(e) = tap.set_queue_attached(true) {
                    error!("Failed to re-attach {nic}'s TAP queue: {e}");
                }
            }
        }
        if !was_paused {
            self.run_state.resume();
            info!("VM resumed after the failed migration");
        }
        self.migrating = None;
        None
    }

    /// After a migration in: each NIC tells the network where the guest is now.
    pub(super) fn announce(&self) {
        for (i, (nic, tap)) in self.taps.iter().enumerate() {
            let Some(mac) = self.config.nets.get(i).and_then(|n| n.mac) else {
                continue;
            };
            match tap.announce(mac.0) {
                Ok(_) => info!("{nic}: announced {mac} (RARP) after the migration"),
                Err(e) => warn!("{nic}: failed to announce {mac}: {e}"),
            }
        }
    }
}
