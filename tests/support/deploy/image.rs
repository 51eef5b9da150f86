//! The Dockerfile and .dockerignore: the image's build stages read as data, and
//! what is wrong with them.

use super::root;

/// A Dockerfile as instructions: continuation lines joined, comments dropped.
#[derive(Clone, Debug)]
pub struct Dockerfile {
    /// (INSTRUCTION in capitals, its arguments).
    pub instructions: Vec<(String, String)>,
}

/// One build stage: `FROM image AS name` and what follows it.
#[derive(Clone, Debug)]
pub struct Stage {
    pub image: String,
    pub name: Option<String>,
    pub instructions: Vec<(String, String)>,
}

impl Dockerfile {
    pub fn load() -> Dockerfile {
        let path = root().join("Dockerfile");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Dockerfile {
        let mut instructions = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            let trimmed = line.trim();
            // Comments and blank lines may also sit between continued lines.
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            if let Some(continued) = trimmed.strip_suffix('\\') {
                current.push_str(continued);
                current.push(' ');
                continue;
            }
            current.push_str(trimmed);
            let (keyword, args) = current
                .split_once(char::is_whitespace)
                .unwrap_or((&current, ""));
            instructions.push((keyword.to_uppercase(), args.trim().to_owned()));
            current.clear();
        }
        Dockerfile { instructions }
    }

    pub fn stages(&self) -> Vec<Stage> {
        let mut stages: Vec<Stage> = Vec::new();
        for (keyword, args) in &self.instructions {
            if keyword == "FROM" {
                let words: Vec<&str> = args
                    .split_whitespace()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                let name = match words[..] {
                    [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_owned()),
                    _ => None,
                };
                stages.push(Stage {
                    image: words.first().map_or(String::new(), |w| (*w).to_owned()),
                    name,
                    instructions: Vec::new(),
                });
            } else if let Some(stage) = stages.last_mut() {
                stage.instructions.push((keyword.clone(), args.clone()));
            }
        }
        stages
    }
}

/// `--from=X` in a COPY's arguments.
pub fn copy_from(args: &str) -> Option<&str> {
    args.split_whitespace()
        .find_map(|w| w.strip_prefix("--from="))
}

/// The words of a JSON-array (exec form) instruction, None for shell form.
pub fn exec_form(args: &str) -> Option<Vec<String>> {
    serde_json::from_str(args).ok()
}

/// The image: named stages, a build stage running the project's own setup and a
/// locked release build, a runtime stage without a Rust toolchain whose
/// entrypoint is the binary it copied from the build stage.
pub fn dockerfile_problems(dockerfile: &Dockerfile, dockerignore: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let stages = dockerfile.stages();
    let mut named = Vec::new();
    for stage in &stages {
        let Some(name) = &stage.name else {
            problems.push(format!(
                "Dockerfile: stage FROM {} has no name",
                stage.image
            ));
            continue;
        };
        for (keyword, args) in &stage.instructions {
            if keyword != "COPY" {
                continue;
            }
            if let Some(from) = copy_from(args)
                && !named.contains(&from.to_owned())
            {
                problems.push(format!(
                    "Dockerfile: {name}: COPY --from={from}, no such earlier stage"
                ));
            }
        }
        named.push(name.clone());
    }
    let Some(runtime) = stages.last() else {
        return vec!["Dockerfile: no stages".to_owned()];
    };
    let image = runtime.image.to_lowercase();
    if image.starts_with("rust") || image.contains("/rust") || image.contains("cargo") {
        problems.push(format!(
            "Dockerfile: the runtime stage runs on {image}, a Rust toolchain image"
        ));
    }
    let copied: Vec<(String, String, String)> = runtime
        .instructions
        .iter()
        .filter(|(k, _)| k == "COPY")
        .filter_map(|(_, args)| {
            let from = copy_from(args)?.to_owned();
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            match words[..] {
                [source, dest] => Some((from, source.to_owned(), dest.to_owned())),
                _ => None,
            }
        })
        .collect();
    let binary = copied
        .iter()
        .find(|(_, source, _)| source.ends_with("/otel-tcpstates"));
    let entrypoint = runtime
        .instructions
        .iter()
        .rev()
        .find(|(k, _)| k == "ENTRYPOINT")
        .and_then(|(_, args)| exec_form(args));
    match (binary, entrypoint) {
        (Some((from, _, dest)), Some(entrypoint)) => {
            if entrypoint != [dest.clone()] {
                problems.push(format!(
                    "Dockerfile: ENTRYPOINT {entrypoint:?} is not the copied binary {dest}"
                ));
            }
            let build = stages.iter().find(|s| s.name.as_ref() == Some(from));
            let runs: Vec<&str> = build
                .into_iter()
                .flat_map(|s| &s.instructions)
                .filter(|(k, _)| k == "RUN")
                .map(|(_, a)| a.as_str())
                .collect();
            if !runs.iter().any(|r| r.contains("scripts/setup.sh")) {
                problems.push(format!(
                    "Dockerfile: stage {from} does not run scripts/setup.sh"
                ));
            }
            let release = |r: &&str| {
                r.contains("cargo build") && r.contains("--release") && r.contains("--locked")
            };
            if !runs.iter().any(release) {
                problems.push(format!(
                    "Dockerfile: stage {from} has no `cargo build --release --locked`"
                ));
            }
        }
        (None, _) => problems.push(
            "Dockerfile: the runtime stage copies no otel-tcpstates binary from a stage".to_owned(),
        ),
        (_, None) => {
            problems.push("Dockerfile: the runtime stage needs an exec-form ENTRYPOINT".to_owned())
        }
    }
    let ignored: Vec<&str> = dockerignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    for must in ["target", ".git"] {
        if !ignored.contains(&must) {
            problems.push(format!(
                ".dockerignore: add {must}/ (large, and not needed)"
            ));
        }
    }
    for needed in [
        "Cargo.lock",
        "Cargo.toml",
        "scripts",
        "rust-toolchain.toml",
        "common",
    ] {
        if ignored.contains(&needed) {
            problems.push(format!(".dockerignore: the build needs {needed}"));
        }
    }
    problems
}

pub fn dockerignore() -> String {
    std::fs::read_to_string(root().join(".dockerignore")).expect("read .dockerignore")
}
