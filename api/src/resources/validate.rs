//! Constraint checks the swagger states but serde cannot express: numeric ranges, string patterns and
//! lengths. The generated models implement [`Validate`]; a violation carries the JSON path of the
//! offending value so the engine can answer 400 with that path as the ARM error `target`.

/// One broken constraint: where (`target`, a JSON path such as `properties.ports[0].port`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// JSON path of the offending value, relative to the resource body.
    pub target: String,
    /// What the spec demands.
    pub message: String,
}

/// Checks the constraints of a typed model after serde accepted its shape.
pub trait Validate {
    /// Appends every broken constraint under `at` (the JSON path of `self`) to `errs`.
    fn validate(&self, at: &str, errs: &mut Vec<Violation>);
}

impl<T: Validate> Validate for Box<T> {
    fn validate(&self, at: &str, errs: &mut Vec<Violation>) {
        (**self).validate(at, errs);
    }
}

/// Runs [`Validate`] from the root `at` and returns the violations (empty when valid).
pub fn violations<T: Validate>(value: &T, at: &str) -> Vec<Violation> {
    let mut errs = Vec::new();
    value.validate(at, &mut errs);
    errs
}

/// `min <= v <= max` (the swagger's inclusive `minimum`/`maximum`).
pub fn check_range(v: f64, min: f64, max: f64, target: &str, errs: &mut Vec<Violation>) {
    if v < min || v > max {
        let bound = match (min > f64::MIN, max < f64::MAX) {
            (true, true) => format!("between {min} and {max}"),
            (true, false) => format!("at least {min}"),
            _ => format!("at most {max}"),
        };
        errs.push(Violation {
            target: target.to_owned(),
            message: format!("The value {v} is out of range: it must be {bound}."),
        });
    }
}

/// `min <= len <= max` for string lengths (in characters) and array sizes.
pub fn check_len(len: usize, min: usize, max: usize, target: &str, errs: &mut Vec<Violation>) {
    if len < min || len > max {
        errs.push(Violation {
            target: target.to_owned(),
            message: format!(
                "The length {len} is out of range: it must be between {min} and {max}."
            ),
        });
    }
}

/// The swagger `pattern` (an ECMA regular expression; the spec's ones are also valid Rust regexes).
pub fn check_pattern(v: &str, pattern: &str, target: &str, errs: &mut Vec<Violation>) {
    // The patterns are compile-time constants from the spec, so a compile failure is a generator bug;
    // treat it as "no constraint" rather than rejecting user input for our mistake.
    let ok = regex::Regex::new(pattern)
        .map(|re| re.is_match(v))
        .unwrap_or(true);
    if !ok {
        errs.push(Violation {
            target: target.to_owned(),
            message: format!("The value '{v}' does not match the pattern '{pattern}'."),
        });
    }
}
