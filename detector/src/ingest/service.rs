//! Which service a process belongs to: the systemd unit, the Docker,
//! containerd, CRI-O or Podman container, the Kubernetes pod.
//!
//! An operator asks "which service is storming", not "which pid". The
//! cgroup v2 path names most of it ([`parse_path`]): systemd puts each unit
//! in `…/<unit>.service` (or `.scope`), container runtimes put each
//! container in a cgroup named after its 64-hex id (`docker-<id>.scope`,
//! `cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`, or
//! a bare `<id>` with the cgroupfs driver), and the kubelet puts each pod in
//! `…pod<uid>…` (dashes written as `_` by the systemd driver). The names a
//! person knows — container name, pod name and namespace — are only in the
//! runtime's metadata on the host, read here ([`ServiceResolver`]) where it
//! is readable, from the files each runtime keeps anyway:
//!
//! | runtime    | file (under the metadata root)                                              |
//! |------------|-----------------------------------------------------------------------------|
//! | containerd | `run/containerd/io.containerd.runtime.v2.task/<ns>/<id>/config.json` (OCI)  |
//! | CRI-O      | `run/containers/storage/overlay-containers/<id>/userdata/config.json` (OCI) |
//! | Docker     | `var/lib/docker/containers/<id>/config.v2.json`                             |
//!
//! Kubernetes names come from the OCI annotations the CRI runtimes write
//! (`io.kubernetes.cri.sandbox-namespace`, `io.kubernetes.pod.namespace`,
//! …) or from Docker's labels of the same names. Nothing here talks to a
//! runtime's socket or the API server: a daemon that watches a host under
//! a storm should not depend on either answering.
//!
//! The metadata root is `/` on a host and wherever the host's `/run` and
//! `/var/lib` are mounted in a container (`[services] metadata_root`).
//! Results are cached by cgroup path, at most [`CACHE_MAX`] of them.
use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Most cgroup paths whose service is cached; the cache is emptied when
/// full (paths of a host number in the hundreds; a churn of containers is
/// what could fill it).
pub const CACHE_MAX: usize = 4096;

/// Largest metadata file read (Docker's config.v2.json of a container with
/// a large environment is tens of KiB).
const METADATA_MAX: u64 = 1 << 20;

/// containerd namespaces looked in, in order: Kubernetes' CRI plugin,
/// Docker (moby), and the default of `ctr`/nerdctl.
const CONTAINERD_NAMESPACES: [&str; 3] = ["k8s.io", "moby", "default"];

/// Where a process runs, as precisely as the host tells.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// "kubernetes", "docker", "containerd", "cri-o", "podman", "container"
    /// (a container whose runtime is unknown), "systemd" or "host".
    pub kind: String,
    /// The short name shown in tables and used as the `service` metric
    /// label: `namespace/pod` for a pod, the container's name (or its
    /// 12-hex id) for a container, the unit for systemd, else "host".
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

impl Service {
    /// The service of processes outside any unit or container.
    pub fn host() -> Service {
        Service {
            kind: "host".into(),
            name: "host".into(),
            ..Default::default()
        }
    }

    /// One line for `explain`: the name, then what else is known.
    pub fn describe(&self) -> String {
        let mut s = format!("{} ({})", self.name, self.kind);
        if let Some(c) = &self.container_name
            && self.pod.is_some()
        {
            s.push_str(&format!(", container {c}"));
        }
        if let Some(id) = &self.container_id {
            s.push_str(&format!(", id {}", short_id(id)));
        }
        if let Some(uid) = &self.pod_uid {
            s.push_str(&format!(", pod uid {uid}"));
        }
        if let Some(unit) = &self.unit
            && *unit != self.name
        {
            s.push_str(&format!(", unit {unit}"));
        }
        s
    }
}

/// The container runtime a cgroup name points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Docker,
    Containerd,
    CriO,
    Podman,
}

impl Runtime {
    fn kind(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Podman => "podman",
        }
    }
}

/// What the cgroup path alone tells.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathParts {
    /// The innermost `.service`/`.scope` that is not a container's scope.
    pub unit: Option<String>,
    pub container_id: Option<String>,
    pub runtime: Option<Runtime>,
    /// With dashes, as the API server writes it.
    pub pod_uid: Option<String>,
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A pod UID (8-4-4-4-12 hex), written with `-` or (systemd driver) `_`.
fn pod_uid(s: &str) -> Option<String> {
    let uid = s.replace('_', "-");
    let groups: Vec<&str> = uid.split('-').collect();
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then_some(uid)
}

/// Splits a cgroup v2 path into the unit, container and pod it names.
pub fn parse_path(cgroup: &str) -> PathParts {
    let mut parts = PathParts::default();
    let mut under_docker = false;
    for seg in cgroup.split('/').filter(|s| !s.is_empty()) {
        let stem = seg
            .strip_suffix(".scope")
            .or_else(|| seg.strip_suffix(".slice"))
            .unwrap_or(seg);
        // Container: "<prefix>-<id>.scope", "<prefix>:<...>:<id>" or a
        // bare id (cgroupfs driver).
        let id = stem.rsplit(['-', ':']).next().unwrap_or(stem);
        if is_container_id(id) {
            parts.container_id = Some(id.to_string());
            parts.runtime = if stem.starts_with("docker-") || under_docker {
                Some(Runtime::Docker)
            } else if stem.starts_with("cri-containerd-") {
                Some(Runtime::Containerd)
            } else if stem.starts_with("crio-") {
                Some(Runtime::CriO)
            } else if stem.starts_with("libpod-") {
                Some(Runtime::Podman)
            } else {
                None
            };
            continue;
        }
        if seg == "docker" {
            under_docker = true;
        }
        // Pod: "kubepods-burstable-pod<uid_>.slice" or "pod<uid>".
        if let Some(uid) = stem
            .rsplit_once("-pod")
            .map(|(_, u)| u)
            .or_else(|| stem.strip_prefix("pod"))
            .and_then(pod_uid)
        {
            parts.pod_uid = Some(uid);
            continue;
        }
        if seg.ends_with(".service") || seg.ends_with(".scope") {
            parts.unit = Some(seg.to_string());
        }
    }
    parts
}

/// The first 12 characters of a container id, as `docker ps` shows it.
pub fn short_id(id: &str) -> &str {
    &id[..12.min(id.len())]
}

/// What a runtime's metadata file says of a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    pub runtime: Option<Runtime>,
    pub container_name: Option<String>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub pod_uid: Option<String>,
}

/// Reads at most [`METADATA_MAX`] bytes of a JSON file.
fn read_json(path: &Path) -> Option<serde_json::Value> {
    let mut text = String::new();
    fs::File::open(path)
        .ok()?
        .take(METADATA_MAX)
        .read_to_string(&mut text)
        .ok()?;
    serde_json::from_str(&text).ok()
}

fn string_at(v: &serde_json::Value, keys: &[&str]) -> Option<String> {
    keys.iter()
        .find_map(|k| v.get(*k).and_then(|x| x.as_str()))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Kubernetes names in an OCI spec's annotations (containerd's CRI plugin
/// and CRI-O write different keys) or in Docker's labels.
fn kubernetes_names(map: &serde_json::Value, m: &mut Metadata) {
    m.namespace = string_at(
        map,
        &[
            "io.kubernetes.cri.sandbox-namespace",
            "io.kubernetes.pod.namespace",
        ],
    );
    m.pod = string_at(
        map,
        &["io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"],
    );
    m.pod_uid = string_at(
        map,
        &["io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid"],
    );
    if let Some(c) = string_at(
        map,
        &[
            "io.kubernetes.cri.container-name",
            "io.kubernetes.container.name",
        ],
    ) {
        m.container_name = Some(c);
    }
}

/// The Kubernetes names in the annotations of an OCI runtime spec (what
/// containerd and CRI-O hand to runc).
fn oci_metadata(spec: &Path, runtime: Runtime) -> Option<Metadata> {
    let spec = read_json(spec)?;
    let mut m = Metadata {
        runtime: Some(runtime),
        ..Default::default()
    };
    if let Some(a) = spec.get("annotations") {
        kubernetes_names(a, &mut m);
    }
    Some(m)
}

/// Reads the metadata of container `id` under `root`, trying the runtime
/// the cgroup named first, then the others.
pub fn read_metadata(root: &Path, id: &str, hint: Option<Runtime>) -> Option<Metadata> {
    let mut order = vec![
        Runtime::Containerd,
        Runtime::CriO,
        Runtime::Docker,
        Runtime::Podman,
    ];
    if let Some(h) = hint {
        order.retain(|r| *r != h);
        order.insert(0, h);
    }
    order.into_iter().find_map(|r| match r {
        Runtime::Containerd => CONTAINERD_NAMESPACES.iter().find_map(|ns| {
            let dir = root.join("run/containerd/io.containerd.runtime.v2.task");
            // Docker's own containers run in containerd's "moby" namespace.
            let runtime = if *ns == "moby" {
                Runtime::Docker
            } else {
                Runtime::Containerd
            };
            oci_metadata(&dir.join(ns).join(id).join("config.json"), runtime)
        }),
        Runtime::CriO => oci_metadata(
            &root
                .join("run/containers/storage/overlay-containers")
                .join(id)
                .join("userdata/config.json"),
            Runtime::CriO,
        ),
        Runtime::Docker => {
            let config = read_json(
                &root
                    .join("var/lib/docker/containers")
                    .join(id)
                    .join("config.v2.json"),
            )?;
            let mut m = Metadata {
                runtime: Some(Runtime::Docker),
                container_name: string_at(&config, &["Name"])
                    .map(|n| n.trim_start_matches('/').to_string()),
                ..Default::default()
            };
            if let Some(labels) = config.get("Config").and_then(|c| c.get("Labels")) {
                kubernetes_names(labels, &mut m);
                if m.pod.is_none()
                    && let Some(s) = string_at(labels, &["com.docker.compose.service"])
                {
                    m.container_name = Some(s);
                }
            }
            Some(m)
        }
        // Podman keeps its metadata in a database (bolt/SQLite), not in
        // a file per container: the cgroup name is all there is.
        Runtime::Podman => None,
    })
}

/// Puts together what the path and the metadata say.
pub fn attribute(parts: &PathParts, meta: Option<&Metadata>) -> Service {
    let runtime = meta.and_then(|m| m.runtime).or(parts.runtime);
    let pod_uid = parts
        .pod_uid
        .clone()
        .or_else(|| meta.and_then(|m| m.pod_uid.clone()));
    let namespace = meta.and_then(|m| m.namespace.clone());
    let pod = meta.and_then(|m| m.pod.clone());
    let container_name = meta.and_then(|m| m.container_name.clone());
    let (kind, name) = if let (Some(ns), Some(p)) = (&namespace, &pod) {
        ("kubernetes".to_string(), format!("{ns}/{p}"))
    } else if let Some(uid) = &pod_uid {
        ("kubernetes".to_string(), format!("pod {uid}"))
    } else if let Some(id) = &parts.container_id {
        (
            runtime.map_or("container", Runtime::kind).to_string(),
            container_name
                .clone()
                .unwrap_or_else(|| short_id(id).to_string()),
        )
    } else if let Some(unit) = &parts.unit {
        ("systemd".to_string(), unit.clone())
    } else {
        return Service::host();
    };
    Service {
        kind,
        name,
        unit: parts.unit.clone(),
        container_id: parts.container_id.clone(),
        container_name,
        pod_uid,
        namespace,
        pod,
    }
}

/// Cgroup path → [`Service`], with the runtime metadata under a root.
#[derive(Debug)]
pub struct ServiceResolver {
    root: PathBuf,
    cache: HashMap<String, Service>,
    /// Times the cache was emptied because it was full.
    pub evictions: u64,
}

impl Default for ServiceResolver {
    fn default() -> Self {
        ServiceResolver::new("/")
    }
}

impl ServiceResolver {
    /// `root`: where the host's `/run` and `/var/lib` are (`/` on a host).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ServiceResolver {
            root: root.into(),
            cache: HashMap::new(),
            evictions: 0,
        }
    }

    /// The service of a process in cgroup `cgroup` (a v2 path).
    pub fn resolve(&mut self, cgroup: &str) -> Service {
        if let Some(s) = self.cache.get(cgroup) {
            return s.clone();
        }
        let parts = parse_path(cgroup);
        let meta = parts
            .container_id
            .as_deref()
            .and_then(|id| read_metadata(&self.root, id, parts.runtime));
        let service = attribute(&parts, meta.as_ref());
        // A container whose metadata is not written yet (the cgroup exists
        // a moment before the runtime's files) is looked up again next
        // time rather than cached nameless.
        if meta.is_some() || parts.container_id.is_none() {
            if self.cache.len() >= CACHE_MAX {
                self.cache.clear();
                self.evictions += 1;
            }
            self.cache.insert(cgroup.to_string(), service.clone());
        }
        service
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

#[cfg(test)]
mod tests;
