//! What the event loop does for the control socket: information, pause and resume, the power
//! button, shutdown, and snapshots (see `crate::persist`).

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{info, warn};
use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

use super::{ExitReason, Vmm, VmmError};
use crate::api::{Command, Reply};
use crate::persist::{self, Snapshot};
use crate::vstate::vcpu::{VcpuHandle, VcpuRequest};

/// How long a pause waits for every vCPU to leave KVM_RUN.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Wakes the event loop when the control socket queued a command (the loop picks it up
/// after `run_with_timeout` returns).
pub struct Wakeup(pub EventFd);

impl MutEventSubscriber for Wakeup {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.0.as_raw_fd(), EventSet::IN)) {
            log::error!("Failed to watch the control socket's wakeup: {e:?}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.read();
    }
}

impl Vmm {
    /// Milliseconds the guest has run, across snapshots.
    pub fn uptime_ms(&self) -> u64 {
        self.uptime_before_ms + self.started.elapsed().as_millis() as u64
    }

    /// Runs one control-socket command; an exit reason when it ends the VM.
    pub(super) fn handle_api(
        &mut self,
        cmd: Command,
        vcpus: &[VcpuHandle],
        stream: Option<std::os::unix::net::UnixStream>,
    ) -> (Reply, Option<ExitReason>) {
        let paused = self.run_state.paused();
        let reply = match cmd {
            Command::Info => Reply::ok(json!({
                "state": if paused { "paused" } else { "running" },
                "uptime_ms": self.uptime_ms(),
                "vcpus": self.config.vcpus,
                "memory_mib": self.config.mem_mib,
                "version": env!("CARGO_PKG_VERSION"),
                "restored_from": self.restored_from,
                "config": self.config,
            })),
            Command::Metrics => match serde_json::from_str::<Value>(&self.metrics.to_json()) {
                Ok(v) => Reply::ok(v),
                Err(e) => Reply::error(500, format!("the metrics report is not JSON: {e}")),
            },
            Command::Pause if paused => Reply::error(409, "the VM is already paused"),
            Command::Pause => match self.pause(vcpus) {
                Ok(()) => Reply::no_content(),
                Err(e) => Reply::error(500, e),
            },
            Command::Resume if !paused => Reply::error(409, "the VM is not paused"),
            Command::Resume => {
                self.run_state.resume();
                info!("VM resumed");
                Reply::no_content()
            }
            Command::PowerButton => match &self.acpi_pm {
                Some(pm) => {
                    pm.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .press_power_button();
                    Reply::no_content()
                }
                None => Reply::error(
                    409,
                    "the VM has no ACPI (--no-acpi), so it has no power button",
                ),
            },
            Command::Shutdown => return (Reply::no_content(), Some(ExitReason::Requested)),
            Command::Migrate(params) => self.start_migration(params, stream),
            Command::Snapshot { .. } if !paused => {
                Reply::error(409, "pause the VM first (vm.pause), then snapshot it")
            }
            Command::Snapshot { .. } if !self.no_persist.is_empty() => Reply::error(
                409,
                format!(
                    "this VM cannot be snapshotted: ferrovm cannot save the state of {} yet",
                    self.no_persist.join(", ")
                ),
            ),
            Command::Snapshot { dir } => match self.snapshot(&dir, vcpus) {
                Ok(v) => Reply::ok(v),
                Err(e @ VmmError::Persist(persist::PersistError::NotEmpty(_))) => {
                    Reply::error(400, e.to_string())
                }
                Err(e) => {
                    warn!("Snapshot to {} failed: {e}", dir.display());
                    Reply::error(500, super::error_chain(&e))
                }
            },
        };
        (reply, None)
    }

    /// Parks every vCPU out of KVM_RUN.
    pub(super) fn pause(&self, vcpus: &[VcpuHandle]) -> Result<(), String> {
        self.run_state.request_pause();
        for v in vcpus {
            v.kick();
        }
        if !self.run_state.wait_parked(PAUSE_TIMEOUT) {
            self.run_state.resume();
            return Err(format!(
                "the vCPUs did not stop within {PAUSE_TIMEOUT:?}; the VM runs on"
            ));
        }
        info!("VM paused");
        Ok(())
    }

    /// Takes the paused VM's whole state (see `crate::persist` for the files).
    pub(super) fn snapshot(&self, dir: &Path, vcpus: &[VcpuHandle]) -> Result<Value, VmmError> {
        let t0 = Instant::now();
        persist::create_dir(dir)?;
        let snap = self.capture(vcpus)?;
        let memory_bytes = persist::write_memory(dir, &self.mem)?;
        let state_bytes = persist::write_state(dir, &snap)?;
        let ms = t0.elapsed().as_millis() as u64;
        info!(
            "Snapshot written to {} in {ms} ms: state {state_bytes} bytes, memory {memory_bytes} bytes",
            dir.display()
        );
        Ok(json!({
            "dir": dir,
            "state_bytes": state_bytes,
            "memory_bytes": memory_bytes,
            "ms": ms,
        }))
    }

    /// Every device (their in-flight work finished first), every vCPU, the in-kernel
    /// devices: the state of a paused VM but its memory.
    pub(super) fn capture(&self, vcpus: &[VcpuHandle]) -> Result<Snapshot, VmmError> {
        let mut devices = BTreeMap::new();
        for (id, dev) in &self.persist {
            let st = dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .save()
                .map_err(|why| VmmError::DeviceState {
                    device: id.clone(),
                    why,
                })?;
            devices.insert(id.clone(), st);
        }
        let mut vcpu_states = Vec::with_capacity(vcpus.len());
        for v in vcpus {
            let (tx, rx) = mpsc::channel();
            self.run_state.request(v.id, VcpuRequest::SaveState(tx));
            let st = rx
                .recv_timeout(PAUSE_TIMEOUT)
                .map_err(|_| VmmError::SnapshotMismatch {
                    what: "vCPU state",
                    why: format!("vCPU {} did not answer", v.id),
                })?
                .map_err(|e| VmmError::VcpuState(v.id, e))?;
            vcpu_states.push(st);
        }
        Ok(Snapshot {
            ferrovm: env!("CARGO_PKG_VERSION").into(),
            config: self.config.clone(),
            memory: persist::memory_layout(&self.mem),
            vm: self.vm.save_state()?,
            vcpus: vcpu_states,
            devices,
            uptime_ms: self.uptime_ms(),
        })
    }
}
