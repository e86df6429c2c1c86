//! Firecracker's REST API on a Unix socket (`--api-sock`), and its JSON configuration file
//! (`--config-file`).
//!
//! Paths, bodies, status codes and the error shape follow Firecracker's swagger definition
//! (`src/firecracker/swagger/firecracker.yaml`), so that its SDKs and orchestrators work
//! unchanged: 204 on success, 200 with JSON for a GET, 400 with `{"fault_message": "..."}` for
//! everything refused.
//!
//! # Threads
//!
//! The API runs on a thread of its own, `api`, which accepts connections and starts a thread,
//! `api-conn`, for each (see [`http`]). Both run under seccomp filters (`crate::seccomp`,
//! installed before either reads from the socket), so a bug in request parsing that a client
//! can reach gets no further than those threads' lists. Those lists hold no file or KVM set-up
//! calls, because the API threads only parse, answer and hand work over, as Firecracker's API
//! thread does:
//!
//! - Before the start, every change of the pre-boot resources (`PUT /boot-source`, `/drives`,
//!   `/machine-config`, ...) runs on the main thread ([`VmmRequest::Change`]), which is waiting
//!   for `InstanceStart` and not yet confined: checking a kernel or a drive stats and opens the
//!   file. `InstanceStart` goes the same way ([`VmmRequest::Start`]): the main thread builds the
//!   VM (files, guest memory, KVM) and then runs it.
//! - Once the VM runs, requests reach it through [`VmControl`]: pause and resume (the vCPU kicks
//!   and `KVM_GET_CLOCK`/`KVM_SET_CLOCK`), `SendCtrlAltDel` (an eventfd write that presses the
//!   ACPI power button) and FlushMetrics (a write to the open metrics file).
//! - GETs read the API's own state.

pub mod firecracker;
pub mod http;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::config::{Transport, VmConfig};
use crate::control::{ControlError, VmControl};
use crate::seccomp::{self, ThreadKind};
use firecracker::{
    ActionType, BootSource, Drive, Entropy, Fault, InstanceActionInfo, InstanceInfo, MachineConfig,
    MachineConfigUpdate, NetworkInterface, VmResources, VmState, VmStateUpdate,
};
use http::{Request, Response};

/// Errors setting up the API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on the API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the API thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("cannot block the termination signals: {0}")]
    Signals(#[source] std::io::Error),
    #[error("the API thread ended before the VM was started")]
    Gone,
    #[error("{0}")]
    Seccomp(#[from] crate::seccomp::Error),
    /// A thread of the API stopped the VMM (see [`VmControl::fail`]).
    #[error("{0}")]
    Failed(String),
}

impl Error {
    /// Whether the user's input caused it (status 2).
    pub fn is_user_input(&self) -> bool {
        matches!(self, Error::Bind { .. })
    }
}

/// Firecracker's answers for resources changed at the wrong time.
const NOT_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";
const NOT_BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";

/// What the API threads hand to the main thread before the VM starts (see the module's
/// documentation).
pub enum VmmRequest {
    /// A change of the pre-boot resources; it sends its own answer back.
    Change(Box<dyn FnOnce() + Send>),
    /// `InstanceStart` (boxed: a whole configuration).
    Start(Box<StartRequest>),
}

impl VmmRequest {
    /// Carries the request out on the calling thread (the main thread). Returns the VM an
    /// `InstanceStart` built, for the caller to run; its answer is sent once that is known.
    fn carry_out(self) -> Option<crate::Vmm> {
        match self {
            VmmRequest::Change(change) => {
                change();
                None
            }
            VmmRequest::Start(request) => match crate::Vmm::build(&request.config) {
                Ok(vmm) => {
                    request.answer(Ok(()));
                    Some(vmm)
                }
                Err(e) => {
                    log::warn!("API: InstanceStart failed: {e}");
                    request.answer(Err(e.to_string()));
                    None
                }
            },
        }
    }
}

/// `InstanceStart`, sent to the main thread, which builds the VM and answers with the outcome.
pub struct StartRequest {
    pub config: VmConfig,
    reply: mpsc::Sender<Result<(), String>>,
}

impl StartRequest {
    pub fn answer(self, outcome: Result<(), String>) {
        // The API thread waits for the answer; if it is gone there is nobody to tell.
        let _ = self.reply.send(outcome);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    NotStarted,
    /// InstanceStart is being handled: nothing else may start or change the VM.
    Starting,
    Running,
}

struct State {
    phase: Phase,
    resources: VmResources,
}

/// What the API thread serves: the pre-boot resources until `InstanceStart`, the running VM after.
pub struct Api {
    state: Mutex<State>,
    /// The command line the resources are applied on (CPU features, log level, ...).
    base: VmConfig,
    control: Arc<VmControl>,
    to_main: mpsc::Sender<VmmRequest>,
}

/// The routes, by method and the path's first segment; `{id}` routes take the rest.
type Handler = fn(&Api, &str, &[u8]) -> Response;
const ROUTES: &[(&str, &str, Handler)] = &[
    ("GET", "", Api::get_instance_info),
    ("GET", "version", Api::get_version),
    ("GET", "machine-config", Api::get_machine_config),
    ("PUT", "machine-config", Api::put_machine_config),
    ("PATCH", "machine-config", Api::patch_machine_config),
    ("PUT", "boot-source", Api::put_boot_source),
    ("PUT", "drives", Api::put_drive),
    ("PUT", "network-interfaces", Api::put_network_interface),
    ("PUT", "entropy", Api::put_entropy),
    ("PUT", "actions", Api::put_action),
    ("PATCH", "vm", Api::patch_vm),
    ("GET", "vm/config", Api::get_vm_config),
];

/// Parses a JSON body as Firecracker does: unknown fields and wrong types are refused.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Response::fault(400, "Empty PUT request."));
    }
    serde_json::from_slice(body).map_err(|e| {
        Response::fault(
            400,
            &format!("An error occurred when deserializing the json body of a request: {e}."),
        )
    })
}

fn json(value: &impl serde::Serialize) -> Response {
    match serde_json::to_string(value) {
        Ok(text) => Response::json(200, text),
        Err(e) => Response::fault(500, &e.to_string()),
    }
}

impl Api {
    /// `resources` describe the VM; `running` says whether the main thread starts it at once
    /// (from `--kernel` or `--config-file`) rather than on `InstanceStart`.
    pub fn new(
        resources: VmResources,
        running: bool,
        base: VmConfig,
        control: Arc<VmControl>,
    ) -> (Arc<Self>, mpsc::Receiver<VmmRequest>) {
        let (tx, rx) = mpsc::channel();
        let phase = if running {
            Phase::Running
        } else {
            Phase::NotStarted
        };
        let api = Api {
            state: Mutex::new(State { phase, resources }),
            base,
            control,
            to_main: tx,
        };
        (Arc::new(api), rx)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers one request.
    pub fn handle(&self, request: &Request) -> Response {
        let path = request.path.trim_matches('/');
        for &(method, route, handler) in ROUTES {
            if method != request.method {
                continue;
            }
            if path == route {
                return handler(self, "", &request.body);
            }
            if let Some(id) = path.strip_prefix(route).and_then(|p| p.strip_prefix('/')) {
                if !route.is_empty() && matches!(route, "drives" | "network-interfaces") {
                    return handler(self, id, &request.body);
                }
            }
        }
        Response::fault(
            400,
            &format!(
                "Invalid request method and/or path: {} {}.",
                request.method, request.path
            ),
        )
    }

    /// Runs `change` on the pre-boot resources, or refuses once the VM is starting or running.
    /// The change runs on the main thread (its checks open files, see the module's
    /// documentation), on a copy that replaces the resources if it succeeds. The lock is held
    /// until the answer comes, so no `InstanceStart` takes the main thread away meanwhile.
    fn before_start(
        &self,
        change: impl FnOnce(&mut VmResources) -> Result<(), Fault> + Send + 'static,
    ) -> Response {
        let mut state = self.lock();
        if state.phase != Phase::NotStarted {
            return Response::fault(400, NOT_AFTER_START);
        }
        let mut resources = state.resources.clone();
        let (reply, answer) = mpsc::channel();
        let job = move || {
            let changed = change(&mut resources).map(|()| resources);
            // The API thread waits for the answer; if it is gone there is nobody to tell.
            let _ = reply.send(changed);
        };
        if self
            .to_main
            .send(VmmRequest::Change(Box::new(job)))
            .is_err()
        {
            return Response::fault(400, "The VMM is not accepting changes.");
        }
        match answer.recv() {
            Ok(Ok(changed)) => {
                state.resources = changed;
                Response::no_content()
            }
            Ok(Err(fault)) => Response::fault(400, &fault),
            Err(_) => Response::fault(400, "The VMM stopped while changing the microVM."),
        }
    }

    fn get_instance_info(&self, _: &str, _: &[u8]) -> Response {
        let state = match self.lock().phase {
            Phase::NotStarted | Phase::Starting => "Not started",
            Phase::Running if self.control.is_paused() => "Paused",
            Phase::Running => "Running",
        };
        json(&InstanceInfo {
            id: "anonymous-instance".to_string(),
            state,
            vmm_version: env!("CARGO_PKG_VERSION"),
            app_name: "vmmkit",
        })
    }

    fn get_version(&self, _: &str, _: &[u8]) -> Response {
        json(&serde_json::json!({ "firecracker_version": env!("CARGO_PKG_VERSION") }))
    }

    fn get_machine_config(&self, _: &str, _: &[u8]) -> Response {
        json(&self.lock().resources.machine)
    }

    fn put_machine_config(&self, _: &str, body: &[u8]) -> Response {
        match parse::<MachineConfig>(body) {
            Ok(machine) => self.before_start(move |r| r.set_machine_config(machine)),
            Err(bad) => bad,
        }
    }

    fn patch_machine_config(&self, _: &str, body: &[u8]) -> Response {
        match parse::<MachineConfigUpdate>(body) {
            Ok(update) => self.before_start(move |r| r.update_machine_config(&update)),
            Err(bad) => bad,
        }
    }

    fn put_boot_source(&self, _: &str, body: &[u8]) -> Response {
        match parse::<BootSource>(body) {
            Ok(boot) => self.before_start(move |r| r.set_boot_source(boot)),
            Err(bad) => bad,
        }
    }

    fn put_drive(&self, id: &str, body: &[u8]) -> Response {
        let drive = match parse::<Drive>(body) {
            Ok(drive) => drive,
            Err(bad) => return bad,
        };
        if drive.drive_id != id {
            return Response::fault(
                400,
                "The id from the path does not match the id from the body!",
            );
        }
        self.before_start(move |r| r.set_drive(drive))
    }

    fn put_network_interface(&self, id: &str, body: &[u8]) -> Response {
        let net = match parse::<NetworkInterface>(body) {
            Ok(net) => net,
            Err(bad) => return bad,
        };
        if net.iface_id != id {
            return Response::fault(
                400,
                "The id from the path does not match the id from the body!",
            );
        }
        self.before_start(move |r| r.set_net(net))
    }

    fn put_entropy(&self, _: &str, body: &[u8]) -> Response {
        match parse::<Entropy>(body) {
            Ok(entropy) => self.before_start(move |r| r.set_entropy(entropy)),
            Err(bad) => bad,
        }
    }

    fn put_action(&self, _: &str, body: &[u8]) -> Response {
        let action = match parse::<InstanceActionInfo>(body) {
            Ok(action) => action.action_type,
            Err(bad) => return bad,
        };
        match action {
            ActionType::InstanceStart => self.instance_start(),
            ActionType::SendCtrlAltDel => self.running(VmControl::ctrl_alt_del),
            // Firecracker answers the same without a metrics sink.
            ActionType::FlushMetrics => match self.control.flush_metrics() {
                Ok(true) => Response::no_content(),
                Ok(false) => Response::fault(400, "The metrics system is not configured."),
                Err(e) => Response::fault(400, &format!("Cannot write the metrics: {e}")),
            },
        }
    }

    /// Runs `f` on the running VM; 400 before the start.
    fn running(&self, f: impl FnOnce(&VmControl) -> Result<(), ControlError>) -> Response {
        if self.lock().phase != Phase::Running {
            return Response::fault(400, NOT_BEFORE_START);
        }
        match f(&self.control) {
            Ok(()) => Response::no_content(),
            Err(e) => Response::fault(400, &e.to_string()),
        }
    }

    fn instance_start(&self) -> Response {
        let config = {
            let mut state = self.lock();
            if state.phase != Phase::NotStarted {
                return Response::fault(400, NOT_AFTER_START);
            }
            match state.resources.to_vm_config(&self.base) {
                Ok(config) => {
                    state.phase = Phase::Starting;
                    config
                }
                Err(fault) => return Response::fault(400, &fault),
            }
        };
        let (reply, outcome) = mpsc::channel();
        let sent = self
            .to_main
            .send(VmmRequest::Start(Box::new(StartRequest { config, reply })));
        let outcome = match sent {
            Ok(()) => outcome
                .recv()
                .unwrap_or_else(|_| Err("The VMM stopped while starting the microVM.".into())),
            Err(_) => Err("The VMM is not accepting a start.".into()),
        };
        match outcome {
            Ok(()) => {
                self.lock().phase = Phase::Running;
                // Answer once the vCPUs run, so that an immediate PATCH /vm finds them.
                if !self.control.wait_started(Duration::from_secs(10)) {
                    log::warn!("API: the vCPUs did not start within 10 s of InstanceStart");
                }
                Response::no_content()
            }
            Err(message) => {
                self.lock().phase = Phase::NotStarted;
                Response::fault(400, &format!("Failed to start the microVM: {message}"))
            }
        }
    }

    fn patch_vm(&self, _: &str, body: &[u8]) -> Response {
        match parse::<VmStateUpdate>(body) {
            Ok(update) => match update.state {
                VmState::Paused => self.running(VmControl::pause),
                VmState::Resumed => self.running(VmControl::resume),
            },
            Err(bad) => bad,
        }
    }

    fn get_vm_config(&self, _: &str, _: &[u8]) -> Response {
        json(&self.lock().resources.full_config())
    }
}

/// Removes the API socket when the VMM ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the socket and starts the API thread, which confines itself (`mode`) before it accepts
/// a connection; returns once it has, or with the error that kept it from doing so. Each
/// connection thread confines itself in turn; if one cannot, `api.control` has the main thread
/// stop the VMM.
fn start_api_thread(path: &Path, api: Arc<Api>, mode: seccomp::Mode) -> Result<SocketFile, Error> {
    let listener = UnixListener::bind(path).map_err(|source| Error::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let socket = SocketFile(path.to_path_buf());
    let control = api.control.clone();
    let connection_start: http::ConnectionStart = Arc::new(move || {
        seccomp::confine(ThreadKind::ApiConnection, mode).map_err(|e| control.fail(e.to_string()))
    });
    let (confined_tx, confined) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("api".to_string())
        .spawn(move || {
            if let Err(e) = crate::console::block_termination_signals_here() {
                log::warn!("API: cannot block the termination signals: {e}");
            }
            let outcome = seccomp::confine(ThreadKind::Api, mode);
            let serving = outcome.is_ok();
            let _ = confined_tx.send(outcome);
            if serving {
                let handler = Arc::new(move |request: &Request| api.handle(request));
                http::serve(listener, handler, connection_start);
            }
        })
        .map_err(Error::Thread)?;
    confined.recv().map_err(|_| Error::Gone)??;
    log::info!("API: listening on {}", path.display());
    Ok(socket)
}

/// Runs the VMM with the API on `--api-sock`. `resources` (from `--config-file`) or a `--kernel`
/// start the VM at once; otherwise it waits for `InstanceStart`. `explicit` names the
/// command-line options the user gave.
pub fn run(
    config: &VmConfig,
    resources: Option<VmResources>,
    explicit: &[&str],
) -> crate::Result<()> {
    let Some(path) = &config.api_sock else {
        return crate::Vmm::build(config)?.run();
    };
    let at_once = config.kernel.is_some();
    let resources = resources.unwrap_or_else(|| VmResources::from_running_cli(config));
    let mut base = config.clone();
    // Firecracker's devices are virtio-mmio, and its guests' boot arguments often say pci=off.
    if !explicit.contains(&"transport") {
        base.transport = Transport::Mmio;
    }
    let control = VmControl::new();
    let (api, requests) = Api::new(resources, at_once, base, control.clone());
    // Blocked before the API thread starts, which inherits the mask: until the console takes
    // them over, termination signals wait here and end the VMM as they would end a running one
    // without a guest to power off, with 128 + the signal.
    crate::console::block_termination_signals_here().map_err(Error::Signals)?;
    let _socket = start_api_thread(path, api, config.seccomp)?;
    if at_once {
        return crate::Vmm::build(config)?.run_with(&control);
    }
    loop {
        if let Some(message) = control.failure() {
            return Err(Error::Failed(message).into());
        }
        match crate::console::take_pending_termination_signal() {
            // A register dump has no vCPUs to dump yet.
            Some(signal) if signal == libc::SIGUSR1 as u32 => {}
            Some(signal) => {
                return Err(crate::Error::Signalled {
                    signal,
                    timeout: None,
                })
            }
            None => {}
        }
        let request = match requests.recv_timeout(Duration::from_millis(100)) {
            Ok(request) => request,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(Error::Gone.into()),
        };
        if let Some(vmm) = request.carry_out() {
            return vmm.run_with(&control);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// An API whose pre-boot requests a thread of the test carries out, as the main thread
    /// would (without building a VM: `InstanceStart` fails).
    fn api() -> Arc<Api> {
        let config = VmConfig::parse_from(["vmm", "--api-sock", "/nonexistent"]);
        let (api, requests) = Api::new(
            VmResources::from_running_cli(&config),
            false,
            config,
            VmControl::new(),
        );
        std::thread::spawn(move || {
            for request in requests {
                match request {
                    VmmRequest::Change(change) => change(),
                    VmmRequest::Start(start) => start.answer(Err("no VM in unit tests".into())),
                }
            }
        });
        api
    }

    fn call(api: &Api, method: &str, path: &str, body: &str) -> Response {
        api.handle(&Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
        })
    }

    fn fault(response: &Response) -> String {
        assert_eq!(response.status, 400, "{response:?}");
        let body: serde_json::Value =
            serde_json::from_str(response.body.as_ref().unwrap()).unwrap();
        body["fault_message"].as_str().unwrap().to_string()
    }

    #[test]
    fn machine_config_round_trips_and_is_checked() {
        let api = api();
        let put = r#"{"vcpu_count": 2, "mem_size_mib": 256}"#;
        assert_eq!(call(&api, "PUT", "/machine-config", put).status, 204);
        let got = call(&api, "GET", "/machine-config", "");
        let got: serde_json::Value = serde_json::from_str(&got.body.unwrap()).unwrap();
        assert_eq!(got["vcpu_count"], 2);
        assert_eq!(got["mem_size_mib"], 256);
        assert_eq!(got["smt"], false);
        let smt = call(
            &api,
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": true}"#,
        );
        assert!(fault(&smt).contains("smt"));
        let zero = call(
            &api,
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 0, "mem_size_mib": 256}"#,
        );
        assert!(fault(&zero).contains("vCPU number"));
    }

    #[test]
    fn bad_bodies_are_400_with_a_fault_message() {
        let api = api();
        for body in [
            "{",
            r#"{"vcpu_count": "two", "mem_size_mib": 256}"#,
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "color": "red"}"#,
            "",
        ] {
            let message = fault(&call(&api, "PUT", "/machine-config", body));
            assert!(!message.is_empty());
        }
        let missing = call(
            &api,
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#,
        );
        assert!(fault(&missing).contains("/nonexistent/vmlinux"));
        let dir = call(
            &api,
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/tmp", "is_root_device": true}"#,
        );
        assert!(fault(&dir).contains("is a directory"));
        let mismatch = call(
            &api,
            "PUT",
            "/drives/a",
            r#"{"drive_id": "b", "path_on_host": "/dev/null", "is_root_device": false}"#,
        );
        assert!(fault(&mismatch).contains("does not match"));
        assert!(fault(&call(&api, "GET", "/nowhere", "")).contains("GET /nowhere"));
        assert!(fault(&call(
            &api,
            "PUT",
            "/actions",
            r#"{"action_type": "Explode"}"#
        ))
        .contains("Explode"));
    }

    #[test]
    fn a_drive_takes_either_io_engine_and_nothing_else() {
        let api = api();
        let image = std::env::temp_dir().join(format!("vmm-api-engine-{}.img", std::process::id()));
        std::fs::write(&image, vec![0u8; 4096]).unwrap();
        let drive = |engine: &str| {
            format!(
                r#"{{"drive_id": "d0", "path_on_host": "{}", "is_root_device": false, "io_engine": "{engine}"}}"#,
                image.display()
            )
        };
        assert!(fault(&call(&api, "PUT", "/drives/d0", &drive("Threads"))).contains("io_engine"));
        for engine in ["Sync", "Async"] {
            assert_eq!(call(&api, "PUT", "/drives/d0", &drive(engine)).status, 204);
            let config = call(&api, "GET", "/vm/config", "");
            let config: serde_json::Value = serde_json::from_str(&config.body.unwrap()).unwrap();
            assert_eq!(config["drives"][0]["io_engine"], engine);
        }
        let _ = std::fs::remove_file(&image);
    }

    #[test]
    fn the_running_vm_is_not_reachable_before_the_start() {
        let api = api();
        let paused = call(&api, "PATCH", "/vm", r#"{"state": "Paused"}"#);
        assert_eq!(fault(&paused), NOT_BEFORE_START);
        let cad = call(
            &api,
            "PUT",
            "/actions",
            r#"{"action_type": "SendCtrlAltDel"}"#,
        );
        assert_eq!(fault(&cad), NOT_BEFORE_START);
        let info = call(&api, "GET", "/", "");
        assert!(info.body.unwrap().contains("\"Not started\""));
        let start = call(
            &api,
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
        );
        assert!(fault(&start).contains("without kernel"));
    }

    /// Pre-boot changes open files, which the API threads' seccomp filters refuse: the main
    /// thread carries them out, and the API thread answers only then.
    #[test]
    fn pre_boot_changes_are_carried_out_by_the_main_thread() {
        let config = VmConfig::parse_from(["vmm", "--api-sock", "/nonexistent"]);
        let (api, requests) = Api::new(
            VmResources::from_running_cli(&config),
            false,
            config,
            VmControl::new(),
        );
        let put = std::thread::spawn({
            let api = api.clone();
            move || {
                let body = r#"{"vcpu_count": 2, "mem_size_mib": 256}"#;
                call(&api, "PUT", "/machine-config", body)
            }
        });
        let request = requests.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(matches!(request, VmmRequest::Change(_)));
        // The API thread waits for the answer, which only carrying the change out sends.
        assert!(!put.is_finished());
        assert!(request.carry_out().is_none());
        assert_eq!(put.join().unwrap().status, 204);
        assert!(call(&api, "GET", "/machine-config", "")
            .body
            .unwrap()
            .contains("\"vcpu_count\":2"));
        // Without a main thread to carry them out, changes are refused rather than left waiting.
        drop(requests);
        assert_eq!(
            fault(&call(&api, "PUT", "/entropy", "{}")),
            "The VMM is not accepting changes."
        );
    }

    #[test]
    fn vm_config_has_the_configuration_files_shape() {
        let api = api();
        let entropy = call(&api, "PUT", "/entropy", "{}");
        assert_eq!(entropy.status, 204);
        let config = call(&api, "GET", "/vm/config", "");
        let config: serde_json::Value = serde_json::from_str(&config.body.unwrap()).unwrap();
        for key in [
            "boot-source",
            "machine-config",
            "drives",
            "network-interfaces",
            "entropy",
        ] {
            assert!(config.get(key).is_some(), "{key} missing from {config}");
        }
        assert!(config["entropy"].is_object());
    }
}
