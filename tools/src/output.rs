//! Output for people and for scripts: aligned tables, `key: value` blocks, or JSON (`--json`).

use std::fmt::Write as _;

use serde::Serialize;
use shale_sr::proto;
use shale_sr::size::format_size;

/// Print a value as pretty JSON on stdout.
pub fn json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Plain aligned columns: a header row and one row per item, two spaces between columns, last column unpadded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// `key: value` lines with the values aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let _ = writeln!(out, "{:<w$} {v}", format!("{k}:"));
    }
    out
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC` (civil-from-days, no time-zone database needed).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

fn obj_name(r: &proto::ObjectRef) -> String {
    if r.name.is_empty() {
        format!("(hidden) {}", r.uuid)
    } else {
        r.name.clone()
    }
}

fn refs(list: &[proto::ObjectRef]) -> String {
    if list.is_empty() {
        return "-".into();
    }
    list.iter().map(obj_name).collect::<Vec<_>>().join(", ")
}

fn opt_size(v: Option<u64>, none: &str) -> String {
    v.map(format_size).unwrap_or_else(|| none.to_string())
}

/// `shale sr list`.
pub fn sr_table(srs: &[proto::Sr]) -> String {
    let rows: Vec<Vec<String>> = srs
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.r#type.clone(),
                // The status's first word (attached, degraded, detached, unavailable); `sr show` has the rest.
                s.status
                    .split([':', '('])
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string(),
                s.vdis.to_string(),
                s.snapshots.to_string(),
                format_size(s.allocated_bytes),
                opt_size(s.capacity, "unlimited"),
                s.uuid.clone(),
                s.path.clone(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "TYPE",
            "STATUS",
            "VDIS",
            "SNAPSHOTS",
            "ALLOCATED",
            "CAPACITY",
            "UUID",
            "PATH",
        ],
        &rows,
    )
}

/// `shale sr show`.
pub fn sr_fields(s: &proto::Sr) -> String {
    let mut pairs = vec![
        ("name", s.name.clone()),
        ("uuid", s.uuid.clone()),
        ("type", s.r#type.clone()),
        ("path", s.path.clone()),
        ("status", s.status.clone()),
        ("created", utc(s.created)),
    ];
    if s.status == "attached" {
        pairs.extend([
            ("cluster size", format_size(u64::from(s.cluster_size))),
            (
                "capacity",
                opt_size(s.capacity, "unlimited (until the filesystem is full)"),
            ),
            (
                "allocated",
                format!(
                    "{} ({} bytes)",
                    format_size(s.allocated_bytes),
                    s.allocated_bytes
                ),
            ),
            ("free", opt_size(s.free_bytes, "filesystem free space")),
            (
                "reclaimed",
                format!("{} (by GC since creation)", format_size(s.reclaimed_bytes)),
            ),
            ("gc pending", format!("{} volume(s)", s.gc_pending)),
            ("vdis", s.vdis.to_string()),
            ("snapshots", s.snapshots.to_string()),
            (
                "metadata reads",
                format!("{} (lookup-cache misses since attach)", s.metadata_reads),
            ),
        ]);
    }
    if let Some(c) = &s.capabilities {
        let mut caps = Vec::new();
        for (on, name) in [
            (c.thin, "thin"),
            (c.snapshot, "snapshot"),
            (c.clone, "clone"),
            (c.revert, "revert"),
            (c.resize_grow, "grow"),
            (c.resize_shrink, "shrink"),
            (c.digest, "digest"),
            (c.check, "check"),
            (c.gc, "gc"),
            (c.offloaded_snapshots, "offloaded-snapshots"),
            (c.changed_blocks, "changed-blocks"),
        ] {
            if on {
                caps.push(name);
            }
        }
        pairs.push(("capabilities", caps.join(" ")));
    }
    fields(&pairs)
}

/// `vdi diff`: the changed extents, then one summary line.
pub fn diff(r: &proto::VdiDiffReply) -> String {
    let name =
        |o: &Option<proto::ObjectRef>| o.as_ref().map(|o| o.name.clone()).unwrap_or_default();
    let rows: Vec<Vec<String>> = r
        .extents
        .iter()
        .map(|e| {
            vec![
                e.offset.to_string(),
                e.length.to_string(),
                format_size(e.length),
            ]
        })
        .collect();
    let mut out = if rows.is_empty() {
        String::new()
    } else {
        table(&["OFFSET", "LENGTH", "SIZE"], &rows)
    };
    out.push_str(&format!(
        "{} changed in {} extent(s) of '{}' ({}) since '{}', at {} granularity\n",
        format_size(r.changed_bytes),
        r.extents.len(),
        name(&r.vdi),
        format_size(r.size),
        name(&r.from),
        format_size(r.granularity),
    ));
    out
}

fn kind_label(v: &proto::Vdi) -> String {
    if v.hidden {
        format!("{} (hidden)", v.kind)
    } else {
        v.kind.clone()
    }
}

/// `shale vdi list`.
pub fn vdi_table(vdis: &[proto::Vdi]) -> String {
    let rows: Vec<Vec<String>> = vdis
        .iter()
        .map(|v| {
            let from = match (&v.snapshot_of, &v.parent) {
                (Some(of), _) => format!("of {}", obj_name(of)),
                (None, Some(p)) => format!("from {}", obj_name(p)),
                _ => "-".into(),
            };
            vec![
                or_dash(&v.name),
                kind_label(v),
                v.sr_name.clone(),
                format_size(v.size),
                format_size(v.allocated_bytes),
                from,
                v.uuid.clone(),
            ]
        })
        .collect();
    table(
        &["NAME", "KIND", "SR", "SIZE", "ALLOCATED", "PARENT", "UUID"],
        &rows,
    )
}

/// `shale vdi show` (and the output of commands that create or change a VDI).
pub fn vdi_fields(v: &proto::Vdi) -> String {
    let mut pairs = vec![
        ("name", or_dash(&v.name)),
        ("uuid", v.uuid.clone()),
        ("kind", kind_label(v)),
        ("sr", format!("{} ({})", v.sr_name, v.sr_uuid)),
        (
            "size",
            format!("{} ({} bytes)", format_size(v.size), v.size),
        ),
        (
            "allocated",
            format!(
                "{} ({} bytes)",
                format_size(v.allocated_bytes),
                v.allocated_bytes
            ),
        ),
        (
            "read-only",
            if v.read_only {
                "yes".into()
            } else {
                "no".into()
            },
        ),
    ];
    if let Some(of) = &v.snapshot_of {
        pairs.push(("snapshot of", obj_name(of)));
    }
    if let Some(p) = &v.parent {
        pairs.push(("parent", obj_name(p)));
    }
    if v.kind == "vdi" {
        pairs.push(("snapshots", refs(&v.snapshots)));
    } else {
        pairs.push(("clones", refs(&v.clones)));
    }
    pairs.push(("created", utc(v.created)));
    fields(&pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    LONGER\nxyz  1\nq    22\n");
    }

    #[test]
    fn dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }

    /// `vdi diff` prints one row per extent and a summary naming both sides.
    #[test]
    fn diff_text() {
        let obj = |n: &str| {
            Some(proto::ObjectRef {
                uuid: String::new(),
                name: n.into(),
            })
        };
        let mut r = proto::VdiDiffReply {
            vdi: obj("d"),
            from: obj("base"),
            size: 8 << 20,
            granularity: 65536,
            extents: vec![proto::Extent {
                offset: 1 << 20,
                length: 131072,
            }],
            changed_bytes: 131072,
        };
        let t = diff(&r);
        assert!(
            t.contains("OFFSET") && t.contains("1048576") && t.contains("131072"),
            "{t}"
        );
        assert!(
            t.ends_with("128 KiB changed in 1 extent(s) of 'd' (8 MiB) since 'base', at 64 KiB granularity\n"),
            "{t}"
        );
        r.extents.clear();
        r.changed_bytes = 0;
        assert!(
            diff(&r).starts_with("0 B changed in 0 extent(s)"),
            "{}",
            diff(&r)
        );
    }

    /// `sr show` lists what an SR type does itself, including snapshots offloaded to the backend.
    #[test]
    fn capabilities_include_offloaded_snapshots() {
        let sr = proto::Sr {
            name: "fast".into(),
            capabilities: Some(proto::Capabilities {
                snapshot: true,
                clone: true,
                offloaded_snapshots: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let f = sr_fields(&sr);
        assert!(
            f.contains("capabilities:") && f.contains("snapshot clone offloaded-snapshots"),
            "{f}"
        );
        let thin = proto::Sr {
            capabilities: Some(proto::Capabilities {
                thin: true,
                snapshot: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(!sr_fields(&thin).contains("offloaded"));
    }

    #[test]
    fn fields_align() {
        let f = fields(&[("a", "1".into()), ("long key", "2".into())]);
        assert_eq!(f, "a:        1\nlong key: 2\n");
    }
}
