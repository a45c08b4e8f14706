//! The host's SR registry: which SRs this host owns, by name, type and path.
//!
//! It is a small JSON file in the daemon's state directory (`registry.json`). SR metadata proper lives inside
//! each SR; the registry only says where to find them, so it stays tiny and human-readable. Every change is
//! written to a temporary file, fsynced, renamed over the old file and the directory fsynced, so a crash leaves
//! either the old or the new registry, never a torn one.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Result, SrError};

/// Current registry file format.
const VERSION: u32 = 1;

/// One SR known to this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SrRecord {
    /// The SR's UUID.
    pub uuid: Uuid,
    /// Host-unique name.
    pub name: String,
    /// Driver type name.
    #[serde(rename = "type")]
    pub sr_type: String,
    /// Where the SR lives (absolute).
    pub path: PathBuf,
    /// When it was added, Unix seconds.
    pub created: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct RegistryFile {
    version: u32,
    srs: Vec<SrRecord>,
}

/// The registry, loaded in memory and written through on every change.
#[derive(Debug)]
pub struct Registry {
    path: PathBuf,
    srs: Vec<SrRecord>,
}

impl Registry {
    /// File name inside the state directory.
    pub const FILE: &'static str = "registry.json";

    /// Load the registry from `state_dir`. Returns `None` when there is none yet (first start).
    pub fn load(state_dir: &Path) -> Result<Option<Registry>> {
        let path = state_dir.join(Self::FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(SrError::Registry(path, e.to_string())),
        };
        let file: RegistryFile = serde_json::from_str(&text)
            .map_err(|e| SrError::Registry(path.clone(), format!("unreadable: {e}")))?;
        if file.version != VERSION {
            return Err(SrError::Registry(
                path,
                format!("unsupported version {}", file.version),
            ));
        }
        Ok(Some(Registry {
            path,
            srs: file.srs,
        }))
    }

    /// A new, empty registry for `state_dir` (written on first change, or by [`Registry::save`]).
    pub fn empty(state_dir: &Path) -> Registry {
        Registry {
            path: state_dir.join(Self::FILE),
            srs: Vec::new(),
        }
    }

    /// Every record, in creation order.
    pub fn records(&self) -> &[SrRecord] {
        &self.srs
    }

    /// Add a record and persist.
    pub fn add(&mut self, rec: SrRecord) -> Result<()> {
        self.srs.push(rec);
        if let Err(e) = self.save() {
            self.srs.pop();
            return Err(e);
        }
        Ok(())
    }

    /// Remove a record and persist.
    pub fn remove(&mut self, uuid: Uuid) -> Result<()> {
        let Some(pos) = self.srs.iter().position(|r| r.uuid == uuid) else {
            return Ok(());
        };
        let rec = self.srs.remove(pos);
        if let Err(e) = self.save() {
            self.srs.insert(pos, rec);
            return Err(e);
        }
        Ok(())
    }

    /// Write the registry atomically (temp file, fsync, rename, fsync directory).
    pub fn save(&self) -> Result<()> {
        let err = |e: std::io::Error| SrError::Registry(self.path.clone(), e.to_string());
        let dir = self.path.parent().unwrap_or_else(|| Path::new("."));
        let tmp = self.path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(&RegistryFile {
            version: VERSION,
            srs: self.srs.clone(),
        })
        .map_err(|e| SrError::Registry(self.path.clone(), e.to_string()))?;
        {
            let mut f = File::create(&tmp).map_err(err)?;
            f.write_all(&body).map_err(err)?;
            f.write_all(b"\n").map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        fs::rename(&tmp, &self.path).map_err(err)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_atomic_replace() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Registry::load(dir.path()).unwrap().is_none());
        let mut r = Registry::empty(dir.path());
        let rec = SrRecord {
            uuid: Uuid::new_v4(),
            name: "local".into(),
            sr_type: "thin".into(),
            path: dir.path().join("srs/local"),
            created: 1,
        };
        r.add(rec.clone()).unwrap();
        let again = Registry::load(dir.path()).unwrap().unwrap();
        assert_eq!(again.records(), std::slice::from_ref(&rec));
        r.remove(rec.uuid).unwrap();
        assert!(Registry::load(dir.path())
            .unwrap()
            .unwrap()
            .records()
            .is_empty());
        assert!(!dir.path().join("registry.json.tmp").exists());
    }

    #[test]
    fn refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(Registry::FILE), "not json").unwrap();
        let e = Registry::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("unreadable"), "{e}");
    }
}
