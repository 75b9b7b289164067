//! Which upstream (E2B) envd version envd claims to be.
//!
//! E2B's host side gates features on the version envd reports (`envd
//! -version` at template build, `X-Envd-Version` on `/init`): claim 0.6.3 and
//! the orchestrator calls `/freeze` before every pause. So envd claims the
//! highest upstream version whose every gated feature it implements, from the
//! table below, and never more. envd's own version (`--version`, `/metrics`)
//! is separate.

/// An upstream version, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// A feature E2B's SDKs or orchestrator enable from `version` on.
#[derive(Debug, Clone, Copy)]
pub struct Gate {
    pub version: Version,
    pub feature: &'static str,
    pub implemented: bool,
}

/// The upstream release envd follows (e2b-dev/infra `packages/envd`).
pub const UPSTREAM: Version = Version(0, 6, 13);

/// Every version gate of E2B's host side (`packages/shared/pkg/utils/
/// version.go`, the orchestrator and the SDKs), in version order.
pub const GATES: &[Gate] = &[
    gate(0, 1, 0, "the SDKs accept the template", true),
    gate(0, 1, 4, "recursive WatchDir", true),
    gate(
        0,
        2,
        0,
        "access token (/init accessToken, X-Access-Token)",
        true,
    ),
    gate(0, 3, 0, "Start with stdin=false", true),
    gate(0, 4, 0, "default user (requests without a user)", true),
    gate(0, 5, 0, "snapshots (pause/resume, /init clock)", true),
    gate(0, 5, 2, "CloseStdin", true),
    gate(0, 5, 7, "octet-stream, gzip and iterable uploads", true),
    gate(0, 5, 13, "/init caBundle (network rules)", true),
    gate(0, 5, 14, "/init volumeMounts (NFS volumes)", true),
    gate(0, 6, 2, "file metadata (X-Metadata-*)", true),
    gate(0, 6, 3, "/freeze and /unfreeze; watch include_entry", true),
    gate(0, 6, 4, "allow_network_mounts in watches", true),
    gate(0, 6, 5, "/collapse", true),
    gate(0, 6, 6, "/fsfreeze and /fsthaw", true),
    gate(0, 6, 12, "/upgrade (live upgrade with a handover)", true),
];

const fn gate(
    major: u32,
    minor: u32,
    patch: u32,
    feature: &'static str,
    implemented: bool,
) -> Gate {
    Gate {
        version: Version(major, minor, patch),
        feature,
        implemented,
    }
}

/// The version envd reports as upstream's: the release just below the first
/// gate it lacks (or [`UPSTREAM`] when it lacks none).
pub fn claimed() -> Version {
    claimed_from(GATES)
}

fn claimed_from(gates: &[Gate]) -> Version {
    let mut last_whole = Version(0, 0, 0);
    for g in gates {
        if !g.implemented {
            let Version(major, minor, patch) = g.version;
            // Releases go up by patch; a missing x.y.0 falls back to the last
            // gate that was whole.
            return if patch > 0 {
                Version(major, minor, patch - 1).max(last_whole)
            } else {
                last_whole
            };
        }
        last_whole = g.version;
    }
    UPSTREAM
}

/// [`claimed`] as the text of `-version` and `X-Envd-Version`.
pub fn claimed_text() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| claimed().to_string())
}

/// The gates a claimed version promises and envd lacks: empty, always.
pub fn broken_promises() -> Vec<&'static Gate> {
    let v = claimed();
    GATES
        .iter()
        .filter(|g| g.version <= v && !g.implemented)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_claim_stops_below_the_first_missing_gate() {
        assert!(broken_promises().is_empty());
        let gates = [
            gate(0, 1, 0, "a", true),
            gate(0, 5, 14, "b", true),
            gate(0, 6, 3, "c", false),
            gate(0, 6, 4, "d", true),
        ];
        assert_eq!(claimed_from(&gates), Version(0, 6, 2));
        let gates = [gate(0, 4, 0, "a", true), gate(0, 5, 0, "b", false)];
        assert_eq!(claimed_from(&gates), Version(0, 4, 0));
        assert_eq!(claimed_from(&[gate(0, 1, 0, "a", true)]), UPSTREAM);
        assert!(GATES.windows(2).all(|w| w[0].version < w[1].version));
    }
}
