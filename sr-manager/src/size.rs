//! Human-readable sizes: `10G`, `512M`, `64K`, `1.5T`, `4096` in; `1 TiB`, `64 KiB`, `1.5 GiB` out.
//!
//! Units are binary (K = 1024), as storage people expect for volume sizes; `K`, `KB`, `KiB` (any case) all mean
//! 1024. Parsing is exact: a fractional value must land on a whole byte (`1.5K` is fine, `1.1K` is refused), so a
//! size typed on the command line never silently changes.

use std::fmt;

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Empty input.
    #[error("empty size")]
    Empty,
    /// The number part is missing or malformed.
    #[error(
        "invalid size '{0}': expected a number with an optional unit, like 10G, 512M, 64K or 4096"
    )]
    Malformed(String),
    /// The unit is not one of B, K, M, G, T, P, E (with optional B/iB).
    #[error("invalid size '{0}': unknown unit '{1}' (use K, M, G, T or P)")]
    UnknownUnit(String, String),
    /// The value does not fit in 64 bits.
    #[error("size '{0}' is too large")]
    Overflow(String),
    /// A fractional value that is not a whole number of bytes.
    #[error("size '{0}' is not a whole number of bytes")]
    Fractional(String),
}

const UNITS: [(&str, u32); 7] = [
    ("", 0),
    ("K", 10),
    ("M", 20),
    ("G", 30),
    ("T", 40),
    ("P", 50),
    ("E", 60),
];

/// Parse a human-readable size into bytes.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: String = num.chars().filter(|&c| c != '_').collect();
    let unit = unit.trim();
    let upper = unit.to_ascii_uppercase();
    let base = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let shift = UNITS
        .iter()
        .find(|(u, _)| *u == base)
        .map(|&(_, sh)| sh)
        .ok_or_else(|| SizeError::UnknownUnit(input.to_string(), unit.to_string()))?;
    if upper == "IB" {
        return Err(SizeError::UnknownUnit(input.to_string(), unit.to_string()));
    }
    let (int_part, frac_part) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num.as_str(), ""),
    };
    if int_part.is_empty() && frac_part.is_empty() || frac_part.contains('.') || num.ends_with('.')
    {
        return Err(SizeError::Malformed(input.to_string()));
    }
    let overflow = || SizeError::Overflow(input.to_string());
    let int: u64 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| overflow())?
    };
    let mut bytes = int.checked_mul(1u64 << shift).ok_or_else(overflow)?;
    if !frac_part.is_empty() {
        // frac * 2^shift must be a whole number: compute frac_digits * 2^shift / 10^len exactly in u128.
        if frac_part.len() > 18 {
            return Err(SizeError::Fractional(input.to_string()));
        }
        let digits: u128 = frac_part
            .parse()
            .map_err(|_| SizeError::Malformed(input.to_string()))?;
        let denom = 10u128.pow(frac_part.len() as u32);
        let scaled = digits << shift;
        if !scaled.is_multiple_of(denom) {
            return Err(SizeError::Fractional(input.to_string()));
        }
        let frac_bytes = u64::try_from(scaled / denom).map_err(|_| overflow())?;
        bytes = bytes.checked_add(frac_bytes).ok_or_else(overflow)?;
    }
    Ok(bytes)
}

/// A byte count that displays in the largest binary unit that keeps it readable (`1 TiB`, `1.5 GiB`, `512 B`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanSize(pub u64);

impl fmt::Display for HumanSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        let names = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        let mut i = 0;
        while i + 1 < names.len() && b >= 1u64 << (10 * (i + 1)) {
            i += 1;
        }
        if i == 0 {
            return write!(f, "{b} B");
        }
        let unit = 1u64 << (10 * i);
        if b.is_multiple_of(unit) {
            write!(f, "{} {}", b / unit, names[i])
        } else {
            let v = b as f64 / unit as f64;
            let s = if v < 10.0 {
                format!("{v:.2}")
            } else {
                format!("{v:.1}")
            };
            write!(
                f,
                "{} {}",
                s.trim_end_matches('0').trim_end_matches('.'),
                names[i]
            )
        }
    }
}

/// Format bytes for people (see [`HumanSize`]).
pub fn format_size(bytes: u64) -> String {
    HumanSize(bytes).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_units() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("64kb"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("2P"), Ok(2 << 50));
        assert_eq!(parse_size(" 10 G "), Ok(10 << 30));
        assert_eq!(parse_size("1_000"), Ok(1000));
    }

    #[test]
    fn parses_fractions_exactly() {
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("0.5G"), Ok(512 << 20));
        assert_eq!(parse_size(".5M"), Ok(512 << 10));
        assert!(matches!(parse_size("1.1K"), Err(SizeError::Fractional(_))));
        assert!(matches!(parse_size("1.5"), Err(SizeError::Fractional(_))));
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("G"), Err(SizeError::Malformed(_))));
        assert!(matches!(
            parse_size("abc"),
            Err(SizeError::Malformed(_)) | Err(SizeError::UnknownUnit(..))
        ));
        assert!(matches!(parse_size("10X"), Err(SizeError::UnknownUnit(..))));
        assert!(matches!(
            parse_size("10GG"),
            Err(SizeError::UnknownUnit(..))
        ));
        assert!(matches!(
            parse_size("10iB"),
            Err(SizeError::UnknownUnit(..))
        ));
        assert!(matches!(parse_size("1.2.3K"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("1."), Err(SizeError::Malformed(_))));
        assert!(matches!(
            parse_size("-1G"),
            Err(SizeError::Malformed(_)) | Err(SizeError::UnknownUnit(..))
        ));
        assert!(matches!(parse_size("16E"), Err(SizeError::Overflow(_))));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(1024), "1 KiB");
        assert_eq!(format_size(64 << 10), "64 KiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(1 << 40), "1 TiB");
        assert_eq!(format_size((10 << 30) + (1 << 29)), "10.5 GiB");
        assert_eq!(format_size(u64::MAX), "16 EiB");
    }

    #[test]
    fn round_trips() {
        for &b in &[512u64, 4096, 65536, 1 << 30, 3 << 40] {
            let s = format_size(b).replace(' ', "");
            assert_eq!(parse_size(&s), Ok(b), "{s}");
        }
    }
}
