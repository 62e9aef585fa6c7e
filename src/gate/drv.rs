//! What a build is for the scheduler: the derivation's path, system and required features,
//! from a BasicDerivation on the wire or from a `.drv` file (ATerm) in the builder's store.

use super::wire::{Reader, Short};

/// The system and required features of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DrvInfo {
    /// `platform`, e.g. `x86_64-linux`.
    pub system: String,
    /// `requiredSystemFeatures`, sorted and deduplicated, plus `ca-derivations` when an output
    /// is content-addressed and floating (Nix adds it itself).
    pub required_features: Vec<String>,
}

impl DrvInfo {
    fn from_parts(system: String, env: &[(String, String)], floating: bool) -> Self {
        let mut features: Vec<String> = Vec::new();
        for (k, v) in env {
            if k == "requiredSystemFeatures" {
                features.extend(v.split_whitespace().map(str::to_owned));
            } else if k == "__json"
                && let Ok(serde_json::Value::Object(attrs)) = serde_json::from_str(v)
                && let Some(serde_json::Value::Array(list)) = attrs.get("requiredSystemFeatures")
            {
                features.extend(list.iter().filter_map(|f| f.as_str().map(str::to_owned)));
            }
        }
        if floating {
            features.push("ca-derivations".to_owned());
        }
        features.sort();
        features.dedup();
        DrvInfo {
            system,
            required_features: features,
        }
    }
}

/// Reads a BasicDerivation (worker and serve protocols alike): outputs, input sources,
/// platform, builder, arguments, environment.
pub fn read_basic_derivation(r: &mut Reader<'_>) -> Result<DrvInfo, Short> {
    let outputs = r.count()?;
    let mut floating = false;
    for _ in 0..outputs {
        r.bytes()?; // name
        let path = r.bytes()?;
        let algo = r.bytes()?;
        r.bytes()?; // hash
        floating |= path.is_empty() && !algo.is_empty();
    }
    r.skip_string_list()?; // input sources
    let system = r.string()?;
    r.bytes()?; // builder
    r.skip_string_list()?; // args
    let n = r.count()?;
    let mut env = Vec::new();
    for _ in 0..n {
        let k = r.string()?;
        let v = r.bytes()?;
        // Only two variables matter; the rest (possibly large) is not copied.
        if k == "requiredSystemFeatures" || k == "__json" {
            env.push((k, String::from_utf8_lossy(v).into_owned()));
        }
    }
    Ok(DrvInfo::from_parts(system, &env, floating))
}

/// A `.drv` file could not be read as a derivation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a derivation (ATerm): {what} at byte {at}")]
pub struct AtermError {
    /// What was expected.
    pub what: &'static str,
    /// Where.
    pub at: usize,
}

/// A parsed ATerm value: enough of the grammar for `.drv` files.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Str(String),
    List(Vec<Term>),
    Tuple(Vec<Term>),
}

struct Aterm<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Aterm<'_> {
    fn err(&self, what: &'static str) -> AtermError {
        AtermError { what, at: self.pos }
    }

    fn eat(&mut self, c: u8) -> Result<(), AtermError> {
        if self.s.get(self.pos) == Some(&c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err("a delimiter"))
        }
    }

    fn term(&mut self, depth: u32) -> Result<Term, AtermError> {
        if depth > 8 {
            return Err(self.err("shallow nesting"));
        }
        match self.s.get(self.pos) {
            Some(b'"') => self.string().map(Term::Str),
            Some(b'[') => self.seq(b'[', b']', depth).map(Term::List),
            Some(b'(') => self.seq(b'(', b')', depth).map(Term::Tuple),
            _ => Err(self.err("a string, list or tuple")),
        }
    }

    fn seq(&mut self, open: u8, close: u8, depth: u32) -> Result<Vec<Term>, AtermError> {
        self.eat(open)?;
        let mut v = Vec::new();
        if self.s.get(self.pos) == Some(&close) {
            self.pos += 1;
            return Ok(v);
        }
        loop {
            v.push(self.term(depth + 1)?);
            match self.s.get(self.pos) {
                Some(b',') => self.pos += 1,
                Some(c) if *c == close => {
                    self.pos += 1;
                    return Ok(v);
                }
                _ => return Err(self.err("a comma or a closing bracket")),
            }
        }
    }

    fn string(&mut self) -> Result<String, AtermError> {
        self.eat(b'"')?;
        let mut out = Vec::new();
        loop {
            match self.s.get(self.pos) {
                None => return Err(self.err("the end of a string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(String::from_utf8_lossy(&out).into_owned());
                }
                Some(b'\\') => {
                    let c = *self.s.get(self.pos + 1).ok_or(self.err("an escape"))?;
                    out.push(match c {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        other => other,
                    });
                    self.pos += 2;
                }
                Some(c) => {
                    out.push(*c);
                    self.pos += 1;
                }
            }
        }
    }
}

/// Reads the system and required features from a `.drv` file's text
/// (`Derive([outputs],[inputDrvs],[inputSrcs],"system","builder",[args],[env])`).
pub fn parse_aterm(text: &[u8]) -> Result<DrvInfo, AtermError> {
    let mut p = Aterm { s: text, pos: 0 };
    if !text.starts_with(b"Derive") {
        return Err(p.err("`Derive`"));
    }
    p.pos = "Derive".len();
    let Term::Tuple(fields) = p.term(0)? else {
        return Err(p.err("a tuple"));
    };
    let bad = AtermError {
        what: "seven derivation fields",
        at: p.pos,
    };
    let [
        Term::List(outputs),
        _,
        _,
        Term::Str(system),
        _,
        _,
        Term::List(env),
    ] = &fields[..]
    else {
        return Err(bad);
    };
    let floating = outputs.iter().any(|o| {
        matches!(o, Term::Tuple(t) if matches!(&t[..],
            [_, Term::Str(path), Term::Str(algo), _] if path.is_empty() && !algo.is_empty()))
    });
    let env: Vec<(String, String)> = env
        .iter()
        .filter_map(|e| match e {
            Term::Tuple(kv) => match &kv[..] {
                [Term::Str(k), Term::Str(v)] => Some((k.clone(), v.clone())),
                _ => None,
            },
            _ => None,
        })
        .collect();
    Ok(DrvInfo::from_parts(system.clone(), &env, floating))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRV: &str = r#"Derive([("out","/nix/store/aaa-x","","")],[("/nix/store/bbb-y.drv",["out"])],["/nix/store/ccc-src"],"x86_64-linux","/nix/store/ddd-busybox/busybox",["sh","-c","echo \"hi\"\n"],[("out","/nix/store/aaa-x"),("requiredSystemFeatures","kvm big-parallel")])"#;

    /// System and features come out of a `.drv`, escapes included.
    #[test]
    fn aterm_system_and_features() {
        let i = parse_aterm(DRV.as_bytes()).unwrap();
        assert_eq!(i.system, "x86_64-linux");
        assert_eq!(i.required_features, vec!["big-parallel", "kvm"]);
    }

    /// Structured attributes carry the features in `__json`; floating outputs add
    /// `ca-derivations`.
    #[test]
    fn structured_attrs_and_floating_outputs() {
        let drv = r#"Derive([("out","","r:sha256","")],[],[],"aarch64-linux","b",[],[("__json","{\"requiredSystemFeatures\":[\"kvm\"]}")])"#;
        let i = parse_aterm(drv.as_bytes()).unwrap();
        assert_eq!(i.system, "aarch64-linux");
        assert_eq!(i.required_features, vec!["ca-derivations", "kvm"]);
    }

    /// Anything else is an error, never a panic.
    #[test]
    fn garbage_is_an_error() {
        for bad in ["", "Derive", "Derive(", "Derive([],[],[],\"x\")", "Derivex"] {
            assert!(parse_aterm(bad.as_bytes()).is_err(), "{bad}");
        }
        for cut in 0..DRV.len() {
            assert!(parse_aterm(&DRV.as_bytes()[..cut]).is_err());
        }
    }
}
