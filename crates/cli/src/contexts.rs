//! Which control plane the CLI talks to, found the way kubectl finds its cluster: the
//! `--context` flag, then `BULKHEAD_CONTEXT`, then the current context of the CLI's config
//! file, then `bulkhead-data/admin.yaml` in the working directory.
//!
//! A context is a name for an admin context file (the `admin.yaml` a control plane writes in
//! its data directory). The config file is `$BULKHEAD_CONFIG`, else
//! `$XDG_CONFIG_HOME/bulkhead/config`, else `~/.config/bulkhead/config`:
//!
//! ```yaml
//! currentContext: staging
//! contexts:
//!   - name: staging
//!     file: /srv/bulkhead-staging/admin.yaml
//! ```
//!
//! A value given with `--context` or `BULKHEAD_CONTEXT` is a path when it has a `/`, else a
//! context's name when the config has one by that name, else the path of an admin context
//! file. A relative `file`
//! in the config is relative to the config file's directory, as kubeconfig's paths are.

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Where the CLI looks when nothing names a context.
pub const DEFAULT_CONTEXT_FILE: &str = "bulkhead-data/admin.yaml";

/// The CLI's config file.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: Vec<Named>,
}

/// One named context.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Named {
    pub name: String,
    pub file: PathBuf,
}

/// The environment the CLI reads, so tests can give their own.
pub struct Env<'a> {
    pub var: &'a dyn Fn(&str) -> Option<String>,
}

impl Env<'_> {
    /// The process's own environment.
    pub fn process() -> Env<'static> {
        Env {
            var: &|k| std::env::var(k).ok().filter(|v| !v.is_empty()),
        }
    }

    /// The config file's path, if the environment says where home is.
    pub fn config_path(&self) -> Option<PathBuf> {
        if let Some(p) = (self.var)("BULKHEAD_CONFIG") {
            return Some(PathBuf::from(p));
        }
        if let Some(x) = (self.var)("XDG_CONFIG_HOME") {
            return Some(Path::new(&x).join("bulkhead/config"));
        }
        (self.var)("HOME").map(|h| Path::new(&h).join(".config/bulkhead/config"))
    }
}

impl Config {
    /// Reads the config at `path`; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let config: Config = serde_saphyr::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e} (the CLI's config: `bulkhead config view` shows the expected shape)",
                path.display()
            )
        })?;
        let mut seen = std::collections::BTreeSet::new();
        for c in &config.contexts {
            if !seen.insert(c.name.as_str()) {
                bail!(
                    "{}: context {:?} is named twice; delete one (`bulkhead config delete-context`)",
                    path.display(),
                    c.name
                );
            }
        }
        Ok(config)
    }

    /// Writes the config to `path` atomically (a new file renamed over the old one), 0600: it
    /// names where admin credentials are.
    pub fn store(&self, path: &Path) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let text = format!(
            "# The bulkhead CLI's contexts (`bulkhead config --help`).\n{}",
            serde_saphyr::to_string(self).context("cannot print the config")?
        );
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            anyhow::anyhow!("cannot write {}: {e}", path.display())
        })
    }

    fn get(&self, name: &str) -> Option<&Named> {
        self.contexts.iter().find(|c| c.name == name)
    }

    fn names(&self) -> String {
        match self.contexts.len() {
            0 => "it has none".into(),
            _ => format!(
                "it has {}",
                self.contexts
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// A context's file, relative paths taken from the config file's directory.
fn file_of(config_path: &Path, c: &Named) -> PathBuf {
    match config_path.parent() {
        Some(dir) if c.file.is_relative() => dir.join(&c.file),
        _ => c.file.clone(),
    }
}

/// The admin context file to use: `given` (the flag, or `BULKHEAD_CONTEXT`) as a name in the
/// config or else a path; else the config's current context; else the default file.
pub fn resolve(given: Option<&str>, env: &Env) -> Result<PathBuf> {
    // A path (names have no '/') needs no config, even a broken one.
    if let Some(given) = given.filter(|g| g.contains('/')) {
        return Ok(PathBuf::from(given));
    }
    let config_path = env.config_path();
    let config = match &config_path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let at = |c: &Named| file_of(config_path.as_deref().unwrap_or(Path::new("")), c);
    if let Some(given) = given {
        return Ok(match config.get(given) {
            Some(c) => at(c),
            None => PathBuf::from(given),
        });
    }
    if let Some(current) = &config.current_context {
        let path = config_path.as_deref().unwrap_or(Path::new("")).display();
        return match config.get(current) {
            Some(c) => Ok(at(c)),
            None => bail!(
                "{path}: the current context {current:?} is not one of its contexts ({}); `bulkhead config use-context NAME` picks another",
                config.names()
            ),
        };
    }
    Ok(PathBuf::from(DEFAULT_CONTEXT_FILE))
}

/// What `bulkhead config` can do.
#[derive(clap::Subcommand, Debug)]
pub enum ConfigCommand {
    /// The contexts, the current one marked with `*`, and the file each names.
    GetContexts {
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "name", "json"])]
        output: String,
    },
    /// The current context's name.
    CurrentContext,
    /// Make NAME the current context: the CLI uses it when neither --context nor
    /// BULKHEAD_CONTEXT is given.
    UseContext { name: String },
    /// Add or change the context NAME (its admin context file, as `bulkhead control` wrote
    /// it in its data directory).
    SetContext {
        name: String,
        /// The admin context file (DATA_DIR/admin.yaml); stored as an absolute path.
        #[arg(long)]
        file: PathBuf,
    },
    /// Remove the context NAME (and unset it if it is the current one).
    DeleteContext { name: String },
    /// Where the config file is and what it holds.
    View,
}

/// Runs `bulkhead config …`, writing what it prints to `out`.
pub fn run(command: ConfigCommand, env: &Env, out: &mut dyn Write) -> Result<()> {
    let Some(path) = env.config_path() else {
        bail!("no config file: set BULKHEAD_CONFIG, XDG_CONFIG_HOME or HOME");
    };
    let mut config = Config::load(&path)?;
    let shown = path.display();
    match command {
        ConfigCommand::GetContexts { output } => {
            let current = config.current_context.as_deref();
            match output.as_str() {
                "name" => {
                    for c in &config.contexts {
                        writeln!(out, "{}", c.name)?;
                    }
                }
                "json" => {
                    let items: Vec<_> = config
                        .contexts
                        .iter()
                        .map(|c| {
                            serde_json::json!({
                                "name": c.name,
                                "file": file_of(&path, c),
                                "current": Some(c.name.as_str()) == current,
                            })
                        })
                        .collect();
                    writeln!(out, "{}", serde_json::to_string_pretty(&items)?)?;
                }
                _ => {
                    let rows: Vec<[String; 3]> = config
                        .contexts
                        .iter()
                        .map(|c| {
                            let mark = if Some(c.name.as_str()) == current {
                                "*"
                            } else {
                                ""
                            };
                            [
                                mark.to_string(),
                                c.name.clone(),
                                file_of(&path, c).display().to_string(),
                            ]
                        })
                        .collect();
                    write!(
                        out,
                        "{}",
                        crate::table::render(&["CURRENT", "NAME", "FILE"], &rows)
                    )?;
                }
            }
        }
        ConfigCommand::CurrentContext => match &config.current_context {
            Some(c) => writeln!(out, "{c}")?,
            None => bail!(
                "{shown} sets no current context; the CLI uses {DEFAULT_CONTEXT_FILE} (`bulkhead config use-context NAME` sets one)"
            ),
        },
        ConfigCommand::UseContext { name } => {
            if config.get(&name).is_none() {
                bail!(
                    "{shown} has no context {name:?} ({}); add it with `bulkhead config set-context {name} --file DATA_DIR/admin.yaml`",
                    config.names()
                );
            }
            config.current_context = Some(name.clone());
            config.store(&path)?;
            writeln!(out, "switched to context {name:?}")?;
        }
        ConfigCommand::SetContext { name, file } => {
            if name.is_empty() || name.contains(['/', ' ']) {
                bail!(
                    "context name {name:?}: use letters, digits, '-', '_' or '.' (a name with '/' would read as a path)"
                );
            }
            let file = std::path::absolute(&file)
                .with_context(|| format!("cannot make {} absolute", file.display()))?;
            if !file.is_file() {
                bail!(
                    "{} is not a file: give the admin context a control plane wrote (DATA_DIR/admin.yaml)",
                    file.display()
                );
            }
            let verb = match config.contexts.iter_mut().find(|c| c.name == name) {
                Some(c) => {
                    c.file = file;
                    "changed"
                }
                None => {
                    config.contexts.push(Named {
                        name: name.clone(),
                        file,
                    });
                    "added"
                }
            };
            config.store(&path)?;
            writeln!(out, "context {name:?} {verb} in {shown}")?;
        }
        ConfigCommand::DeleteContext { name } => {
            let before = config.contexts.len();
            config.contexts.retain(|c| c.name != name);
            if config.contexts.len() == before {
                bail!("{shown} has no context {name:?} ({})", config.names());
            }
            if config.current_context.as_deref() == Some(name.as_str()) {
                config.current_context = None;
            }
            config.store(&path)?;
            writeln!(out, "context {name:?} deleted from {shown}")?;
        }
        ConfigCommand::View => {
            writeln!(out, "# {shown}")?;
            write!(out, "{}", serde_saphyr::to_string(&config)?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Home {
        dir: PathBuf,
        vars: BTreeMap<&'static str, String>,
    }

    impl Home {
        fn new(name: &str) -> Home {
            let dir = std::env::temp_dir()
                .join(format!("bulkhead-contexts-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let vars = BTreeMap::from([("HOME", dir.display().to_string())]);
            Home { dir, vars }
        }

        fn run(&self, command: ConfigCommand) -> Result<String> {
            let var = |k: &str| self.vars.get(k).cloned();
            let mut out = Vec::new();
            run(command, &Env { var: &var }, &mut out)?;
            Ok(String::from_utf8(out).unwrap())
        }

        fn resolve(&self, given: Option<&str>) -> Result<PathBuf> {
            let var = |k: &str| self.vars.get(k).cloned();
            resolve(given, &Env { var: &var })
        }

        fn admin_file(&self, name: &str) -> PathBuf {
            let f = self.dir.join(name).join("admin.yaml");
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(&f, "server: 127.0.0.1:1\n").unwrap();
            f
        }
    }

    impl Drop for Home {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn contexts_are_found_as_kubectl_finds_its_own() {
        let home = Home::new("find");
        // Nothing configured: the data directory in the working directory.
        assert_eq!(
            home.resolve(None).unwrap(),
            PathBuf::from(DEFAULT_CONTEXT_FILE)
        );
        let staging = home.admin_file("staging");
        let prod = home.admin_file("prod");
        let set = |name: &str, file: &Path| ConfigCommand::SetContext {
            name: name.into(),
            file: file.to_path_buf(),
        };
        home.run(set("staging", &staging)).unwrap();
        home.run(set("prod", &prod)).unwrap();
        // Contexts but no current one: still the default.
        assert_eq!(
            home.resolve(None).unwrap(),
            PathBuf::from(DEFAULT_CONTEXT_FILE)
        );
        let said = home
            .run(ConfigCommand::UseContext {
                name: "prod".into(),
            })
            .unwrap();
        assert_eq!(said, "switched to context \"prod\"\n");
        assert_eq!(home.resolve(None).unwrap(), prod);
        // The flag (or BULKHEAD_CONTEXT) wins: a name, else a path.
        assert_eq!(home.resolve(Some("staging")).unwrap(), staging);
        assert_eq!(
            home.resolve(Some("/elsewhere/admin.yaml")).unwrap(),
            PathBuf::from("/elsewhere/admin.yaml")
        );
        let table = home
            .run(ConfigCommand::GetContexts {
                output: "table".into(),
            })
            .unwrap()
            .replace(&home.dir.display().to_string(), "HOME");
        expect_test::expect![[r#"
            CURRENT  NAME     FILE
                     staging  HOME/staging/admin.yaml
            *        prod     HOME/prod/admin.yaml
        "#]]
        .assert_eq(&table);
        assert_eq!(home.run(ConfigCommand::CurrentContext).unwrap(), "prod\n");
        // The file is where kubectl's habits put it, 0600, and reads back.
        let config = home.dir.join(".config/bulkhead/config");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&config).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Deleting the current context unsets it.
        home.run(ConfigCommand::DeleteContext {
            name: "prod".into(),
        })
        .unwrap();
        assert_eq!(
            home.resolve(None).unwrap(),
            PathBuf::from(DEFAULT_CONTEXT_FILE)
        );
    }

    #[test]
    fn bad_configs_and_names_are_refused_in_words() {
        let mut home = Home::new("bad");
        let err = home
            .run(ConfigCommand::UseContext { name: "dev".into() })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("has no context \"dev\" (it has none)")
                && err.contains("bulkhead config set-context dev --file"),
            "{err}"
        );
        let err = home
            .run(ConfigCommand::SetContext {
                name: "dev".into(),
                file: home.dir.join("missing.yaml"),
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a file"), "{err}");

        // XDG_CONFIG_HOME moves it; a current context that is not there is named.
        let xdg = home.dir.join("xdg");
        home.vars
            .insert("XDG_CONFIG_HOME", xdg.display().to_string());
        std::fs::create_dir_all(xdg.join("bulkhead")).unwrap();
        std::fs::write(
            xdg.join("bulkhead/config"),
            "currentContext: gone\ncontexts:\n  - name: dev\n    file: dev/admin.yaml\n",
        )
        .unwrap();
        let err = home.resolve(None).unwrap_err().to_string();
        assert!(
            err.contains("the current context \"gone\" is not one of its contexts (it has dev)"),
            "{err}"
        );
        // A relative file is relative to the config's directory.
        assert_eq!(
            home.resolve(Some("dev")).unwrap(),
            xdg.join("bulkhead/dev/admin.yaml")
        );
        std::fs::write(
            xdg.join("bulkhead/config"),
            "contexts: [{name: a, fil: x}]\n",
        )
        .unwrap();
        let err = home.resolve(None).unwrap_err().to_string();
        assert!(
            err.contains("bulkhead/config") && err.contains("fil"),
            "{err}"
        );
    }
}
