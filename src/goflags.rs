//! Upstream envd's Go-style flags (`-version`, `-port 49983`, `-isnotfc`, …),
//! translated into envd's own before clap parses them, so E2B's template
//! builder and unit files drive envd unchanged.
//!
//! Go's `flag` package accepts `-name` and `--name`, `-name=value` and
//! `-name value` (not for booleans, which take `-name=true|false`). Only the
//! single-dash forms are translated: `--version` stays envd's own (it prints
//! envd's version, not the upstream one it claims).

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    /// Serve, with these arguments (translated) for clap.
    Serve(Vec<String>),
    /// `-version`: print the claimed upstream version and exit.
    PrintVersion,
    /// `-commit`: print the source commit and exit.
    PrintCommit,
}

/// Upstream's boolean flags and what each becomes (`None`: accepted, no
/// effect in envd — said in the help of the flag it maps to).
const BOOLS: &[(&str, Option<&str>)] = &[
    ("isnotfc", Some("--not-vm")),
    ("no-cgroups", Some("--no-cgroups")),
    ("verbose", None),
    ("resume-handover", Some("--resume-handover")),
];

/// Upstream's flags that take a value.
const VALUED: &[&str] = &["port", "cgroup-root", "cmd"];

/// Translates `args` (without the program name).
pub fn translate(args: Vec<String>) -> Result<Invocation, String> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let Some(body) = arg.strip_prefix('-').filter(|b| !b.starts_with('-')) else {
            out.push(arg);
            continue;
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (body, None),
        };
        match name {
            "version" | "commit" => {
                if !bool_value(name, inline.as_deref())? {
                    continue;
                }
                return Ok(if name == "version" {
                    Invocation::PrintVersion
                } else {
                    Invocation::PrintCommit
                });
            }
            _ => {}
        }
        if let Some((_, to)) = BOOLS.iter().find(|(n, _)| *n == name) {
            if bool_value(name, inline.as_deref())? {
                out.extend(to.map(str::to_owned));
            }
            continue;
        }
        if VALUED.contains(&name) {
            let value = match inline {
                Some(v) => v,
                None => it
                    .next()
                    .ok_or_else(|| format!("flag needs an argument: -{name}"))?,
            };
            match name {
                "port" => {
                    let port: u16 = value
                        .parse()
                        .map_err(|_| format!("-port {value:?}: not a TCP port"))?;
                    out.extend(["--listen".to_owned(), format!("tcp://0.0.0.0:{port}")]);
                }
                "cgroup-root" => out.extend(["--cgroup-root".to_owned(), value]),
                _ => out.extend(["--start-cmd".to_owned(), value]),
            }
            continue;
        }
        // Short flags of envd's own (clap's `-h`) and anything unknown go to
        // clap, which explains what it does not know.
        out.push(arg);
    }
    Ok(Invocation::Serve(out))
}

fn bool_value(name: &str, v: Option<&str>) -> Result<bool, String> {
    match v {
        None | Some("true" | "1" | "t" | "T" | "TRUE" | "True") => Ok(true),
        Some("false" | "0" | "f" | "F" | "FALSE" | "False") => Ok(false),
        Some(other) => Err(format!("invalid boolean value {other:?} for -{name}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Vec<String> {
        match translate(args.iter().map(|s| s.to_string()).collect()).unwrap() {
            Invocation::Serve(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn upstream_flags() {
        let v = |a: &[&str]| translate(a.iter().map(|s| s.to_string()).collect());
        assert_eq!(v(&["-version"]), Ok(Invocation::PrintVersion));
        assert_eq!(v(&["-port", "1", "-commit"]), Ok(Invocation::PrintCommit));
        assert_eq!(
            serve(&["-port", "5000", "-isnotfc", "-verbose", "-cmd=echo hi"]),
            [
                "--listen",
                "tcp://0.0.0.0:5000",
                "--not-vm",
                "--start-cmd",
                "echo hi"
            ]
        );
        assert_eq!(
            serve(&["-port=7", "-no-cgroups=false", "-cgroup-root", "/c"]),
            ["--listen", "tcp://0.0.0.0:7", "--cgroup-root", "/c"]
        );
        // envd's own flags pass through untouched.
        assert_eq!(
            serve(&["--listen", "unix:///x", "--version", "-h"]),
            ["--listen", "unix:///x", "--version", "-h"]
        );
        assert!(v(&["-port"]).is_err());
        assert!(v(&["-port", "99999"]).is_err());
        assert!(v(&["-isnotfc=maybe"]).is_err());
        assert_eq!(serve(&["-version=false"]), Vec::<String>::new());
    }
}
