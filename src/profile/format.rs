//! A [`HeapProfile`] as text and bytes for the tools people already use.
//!
//! - [`HeapProfile::folded`]: folded stacks, one line per call stack, root first, the
//!   input of `flamegraph.pl`, `inferno-flamegraph` and speedscope.
//! - [`HeapProfile::pprof`]: gzipped protobuf of pprof's `profile.proto`
//!   (github.com/google/pprof, `proto/profile.proto`), for `go tool pprof` and `pprof`.
//!
//! Both report the sites' estimates (`Site::bytes`, `Site::objects`) rounded to integers.
//! The protobuf is written by hand: the few message types below need only varints and
//! length-delimited fields, not a code generator.

use super::{Frame, HeapProfile, Site};
use flate2::write::GzEncoder;
use flate2::Compression;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

impl HeapProfile {
    /// The profile as folded stacks: `root;caller;leaf <bytes>` per line, sorted.
    ///
    /// Frame names have `;` replaced by `:` and whitespace or control characters by `_`,
    /// so that neither separator appears inside a name. A stack the capture limit cut
    /// short starts with a `[truncated]` frame. Sites with the same folded stack are
    /// merged into one line; bytes are the estimated live bytes, rounded.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), beancounter::BcError> {
    /// let folded = beancounter::profile::heap(beancounter::BcId(7))?.folded();
    /// std::fs::write("tenant-7.folded", folded).expect("write");
    /// # Ok(())
    /// # }
    /// ```
    pub fn folded(&self) -> String {
        let mut stacks: BTreeMap<String, f64> = BTreeMap::new();
        for site in &self.sites {
            *stacks.entry(folded_stack(site)).or_default() += site.bytes;
        }
        // Names hold no character at or below the space, so sorting by stack sorts lines.
        let mut out = String::new();
        for (stack, bytes) in &stacks {
            writeln!(out, "{stack} {}", bytes.round() as u64).expect("writing to a String");
        }
        out
    }

    /// The profile in pprof's format: a gzipped `perftools.profiles.Profile` message.
    ///
    /// Two sample types, `inuse_objects`/`count` and `inuse_space`/`bytes`, the second the
    /// default; the period is the sampling distance in bytes. Each distinct return address
    /// is one `Location`, with one `Line` per function inlined there (innermost first);
    /// each distinct function name and file is one `Function`. The profile's comment names
    /// the tenant.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), beancounter::BcError> {
    /// let pprof = beancounter::profile::heap(beancounter::BcId(7))?.pprof();
    /// std::fs::write("tenant-7.pb.gz", pprof).expect("write");
    /// // then: go tool pprof -top tenant-7.pb.gz
    /// # Ok(())
    /// # }
    /// ```
    pub fn pprof(&self) -> Vec<u8> {
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(&self.pprof_message().0)
            .expect("writing to a Vec cannot fail");
        gz.finish().expect("writing to a Vec cannot fail")
    }

    /// The `Profile` message, before compression.
    fn pprof_message(&self) -> Message {
        let mut tables = Tables::new();
        let mut samples = Vec::with_capacity(self.sites.len());
        for site in &self.sites {
            let mut sample = Message::default();
            let locations: Vec<u64> = site
                .frames
                .chunk_by(|a, b| a.addr == b.addr)
                .map(|inlined| tables.location(inlined))
                .collect();
            sample.packed(1, locations);
            sample.packed(
                2,
                [site.objects, site.bytes].map(|v| v.round() as i64 as u64),
            );
            samples.push(sample);
        }

        // Fields may come in any order; the tables go last, once everything is interned.
        let mut profile = Message::default();
        for (kind, unit) in [("inuse_objects", "count"), ("inuse_space", "bytes")] {
            profile.message(1, tables.value_type(kind, unit));
        }
        for sample in samples {
            profile.message(2, sample);
        }
        let time_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64);
        profile.uint(9, time_nanos);
        profile.message(11, tables.value_type("space", "bytes"));
        profile.uint(12, self.sample_bytes);
        profile.uint(13, tables.string(&format!("tenant {}", self.id)));
        profile.uint(14, tables.string("inuse_space"));
        for location in tables.locations {
            profile.message(4, location);
        }
        for function in tables.functions {
            profile.message(5, function);
        }
        for s in &tables.strings {
            profile.bytes(6, s.as_bytes());
        }
        profile
    }
}

/// One site's folded stack: frame names root first, `;` between them.
fn folded_stack(site: &Site) -> String {
    let mut names: Vec<String> = Vec::with_capacity(site.frames.len() + 1);
    if site.truncated {
        names.push("[truncated]".to_owned());
    }
    names.extend(site.frames.iter().rev().map(|frame| sanitize(&frame.name)));
    if names.is_empty() {
        // A line must start with a frame for flamegraph tools to read it.
        names.push("[unknown]".to_owned());
    }
    names.join(";")
}

/// A frame name that cannot break a folded line: no `;`, no whitespace, no control codes.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            ';' => ':',
            c if c.is_whitespace() || c.is_control() => '_',
            c => c,
        })
        .collect()
}

/// The tables a `Profile` refers into by index or id, filled while its samples are written.
struct Tables {
    /// `string_table`; entry 0 must be `""`.
    strings: Vec<String>,
    string_ids: HashMap<String, u64>,
    /// `Location` messages; a location's id is its index + 1 (id 0 means none).
    locations: Vec<Message>,
    location_ids: HashMap<usize, u64>,
    /// `Function` messages; a function's id is its index + 1.
    functions: Vec<Message>,
    function_ids: HashMap<(String, Option<String>), u64>,
}

impl Tables {
    fn new() -> Self {
        Tables {
            strings: vec![String::new()],
            string_ids: HashMap::from([(String::new(), 0)]),
            locations: Vec::new(),
            location_ids: HashMap::new(),
            functions: Vec::new(),
            function_ids: HashMap::new(),
        }
    }

    /// The index of `s` in the string table, adding it if new.
    fn string(&mut self, s: &str) -> u64 {
        if let Some(&id) = self.string_ids.get(s) {
            return id;
        }
        let id = self.strings.len() as u64;
        self.strings.push(s.to_owned());
        self.string_ids.insert(s.to_owned(), id);
        id
    }

    /// A `ValueType { type, unit }` message.
    fn value_type(&mut self, kind: &str, unit: &str) -> Message {
        let mut m = Message::default();
        m.uint(1, self.string(kind));
        m.uint(2, self.string(unit));
        m
    }

    /// The id of the location at the return address the `inlined` frames share (innermost
    /// first), adding a `Location { id, address, line* }` if new.
    fn location(&mut self, inlined: &[Frame]) -> u64 {
        let addr = inlined[0].addr;
        if let Some(&id) = self.location_ids.get(&addr) {
            return id;
        }
        let id = self.locations.len() as u64 + 1;
        let mut location = Message::default();
        location.uint(1, id);
        location.uint(3, addr as u64);
        for frame in inlined {
            let mut line = Message::default();
            line.uint(1, self.function(frame));
            if let Some(number) = frame.line {
                line.uint(2, u64::from(number));
            }
            location.message(4, line);
        }
        self.locations.push(location);
        self.location_ids.insert(addr, id);
        id
    }

    /// The id of the frame's function, adding a `Function { id, name, system_name,
    /// filename }` if new.
    fn function(&mut self, frame: &Frame) -> u64 {
        let key = (frame.name.clone(), frame.file.clone());
        if let Some(&id) = self.function_ids.get(&key) {
            return id;
        }
        let id = self.functions.len() as u64 + 1;
        let name = self.string(&frame.name);
        let mut function = Message::default();
        function.uint(1, id);
        function.uint(2, name);
        function.uint(3, name);
        if let Some(file) = &frame.file {
            function.uint(4, self.string(file));
        }
        self.functions.push(function);
        self.function_ids.insert(key, id);
        id
    }
}

/// An encoded protobuf message: its fields, appended in the order written.
#[derive(Default)]
struct Message(Vec<u8>);

/// Protobuf wire types (protobuf.dev, "Encoding").
const VARINT: u64 = 0;
const LEN: u64 = 2;

impl Message {
    /// A varint field: any `uint64`, or an `int64` given as its two's complement bits.
    fn uint(&mut self, field: u64, value: u64) {
        put_varint(&mut self.0, (field << 3) | VARINT);
        put_varint(&mut self.0, value);
    }

    /// A length-delimited field: a string, bytes or a packed repeated field.
    fn bytes(&mut self, field: u64, bytes: &[u8]) {
        put_varint(&mut self.0, (field << 3) | LEN);
        put_varint(&mut self.0, bytes.len() as u64);
        self.0.extend_from_slice(bytes);
    }

    /// An embedded message field.
    fn message(&mut self, field: u64, message: Message) {
        self.bytes(field, &message.0);
    }

    /// A packed repeated varint field.
    fn packed(&mut self, field: u64, values: impl IntoIterator<Item = u64>) {
        let mut packed = Vec::new();
        for value in values {
            put_varint(&mut packed, value);
        }
        self.bytes(field, &packed);
    }
}

/// Appends `value` as a base-128 varint, low 7 bits first, high bit set on all but the last.
fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push(value as u8 | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BcId;
    use flate2::read::GzDecoder;
    use std::io::Read as _;
    use std::process::Command;

    fn frame(addr: usize, name: &str) -> Frame {
        Frame {
            addr,
            name: name.to_owned(),
            file: Some("src/lib.rs".to_owned()),
            line: Some(addr as u32),
        }
    }

    /// A site from frames given leaf first.
    fn site(frames: &[Frame], bytes: f64, objects: f64) -> Site {
        Site {
            frames: frames.to_vec(),
            truncated: false,
            bytes,
            objects,
            samples: 1,
        }
    }

    fn profile(sites: Vec<Site>) -> HeapProfile {
        HeapProfile {
            id: BcId(7),
            sample_bytes: 512 << 10,
            sites,
        }
    }

    #[test]
    fn folded_puts_the_root_first_and_merges_identical_stacks() {
        let (main, alpha, beta) = (
            frame(0x10, "main"),
            frame(0x20, "alpha"),
            frame(0x30, "beta"),
        );
        let p = profile(vec![
            site(&[beta, main.clone()], 100.4, 1.0),
            site(&[alpha, main.clone()], 1000.0, 2.0),
            // Another address in the same functions folds to the same stack.
            site(&[frame(0x31, "beta"), frame(0x11, "main")], 200.4, 1.0),
            site(&[main], 7.0, 1.0),
        ]);
        assert_eq!(p.folded(), "main 7\nmain;alpha 1000\nmain;beta 301\n");
        assert_eq!(profile(Vec::new()).folded(), "");
    }

    #[test]
    fn folded_marks_truncated_stacks_at_the_root() {
        let mut cut = site(&[frame(0x20, "alpha"), frame(0x10, "deep")], 64.0, 1.0);
        cut.truncated = true;
        let whole = site(&[frame(0x20, "alpha"), frame(0x10, "deep")], 32.0, 1.0);
        let p = profile(vec![cut, whole]);
        assert_eq!(p.folded(), "[truncated];deep;alpha 64\ndeep;alpha 32\n");
    }

    #[test]
    fn folded_sanitizes_separators_in_names() {
        let odd = frame(0x20, "<Vec<u8> as Extend<&u8>>::extend;x\ny\tz");
        let p = profile(vec![site(&[odd, frame(0x10, "main")], 5.0, 1.0)]);
        assert_eq!(
            p.folded(),
            "main;<Vec<u8>_as_Extend<&u8>>::extend:x_y_z 5\n"
        );
    }

    /// One decoded field: its number and either a varint or the bytes of a `LEN` field.
    #[derive(Debug)]
    enum Field<'a> {
        Varint(u64),
        Len(&'a [u8]),
    }

    fn get_varint(buf: &mut &[u8]) -> u64 {
        let mut value = 0;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = buf.split_first().expect("varint cut short");
            *buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return value;
            }
        }
        panic!("varint longer than 10 bytes");
    }

    fn decode(mut buf: &[u8]) -> Vec<(u64, Field<'_>)> {
        let mut fields = Vec::new();
        while !buf.is_empty() {
            let key = get_varint(&mut buf);
            let field = match key & 7 {
                VARINT => Field::Varint(get_varint(&mut buf)),
                LEN => {
                    let len = get_varint(&mut buf) as usize;
                    let (bytes, rest) = buf.split_at(len);
                    buf = rest;
                    Field::Len(bytes)
                }
                wire => panic!("unexpected wire type {wire}"),
            };
            fields.push((key >> 3, field));
        }
        fields
    }

    fn varints(fields: &[(u64, Field<'_>)], number: u64) -> Vec<u64> {
        let mut out = Vec::new();
        for (_, field) in fields.iter().filter(|(n, _)| *n == number) {
            match field {
                Field::Varint(v) => out.push(*v),
                // A packed repeated field.
                Field::Len(mut bytes) => {
                    while !bytes.is_empty() {
                        out.push(get_varint(&mut bytes));
                    }
                }
            }
        }
        out
    }

    fn messages<'a>(fields: &[(u64, Field<'a>)], number: u64) -> Vec<Vec<(u64, Field<'a>)>> {
        fields
            .iter()
            .filter(|(n, _)| *n == number)
            .map(|(_, field)| match field {
                Field::Len(bytes) => decode(bytes),
                Field::Varint(_) => panic!("field {number} is not a message"),
            })
            .collect()
    }

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut raw = Vec::new();
        GzDecoder::new(gz).read_to_end(&mut raw).expect("gzip");
        raw
    }

    /// A decoded `Location`: its address and its lines as (function name, line number).
    type Location<'a> = (u64, Vec<(&'a str, u64)>);

    /// Two sites sharing `main`; `alpha` has `inner` inlined at its address.
    fn alpha_beta_profile() -> HeapProfile {
        let main = frame(0x1000, "my_crate::main");
        let alpha = [
            frame(0x2000, "my_crate::inner"),
            frame(0x2000, "my_crate::site_alpha"),
            main.clone(),
        ];
        let beta = [frame(0x3000, "my_crate::site_beta"), main];
        profile(vec![
            site(&alpha, 3_000_000.4, 30.6),
            site(&beta, 1_000_000.0, 10.0),
        ])
    }

    #[test]
    fn pprof_decodes_to_the_profile() {
        let raw = gunzip(&alpha_beta_profile().pprof());
        let profile = decode(&raw);

        let strings: Vec<&str> = profile
            .iter()
            .filter(|(n, _)| *n == 6)
            .map(|(_, field)| match field {
                Field::Len(bytes) => std::str::from_utf8(bytes).expect("utf-8"),
                Field::Varint(_) => panic!("string as varint"),
            })
            .collect();
        assert_eq!(strings[0], "");
        let s = |i: u64| strings[i as usize];

        let types: Vec<(&str, &str)> = messages(&profile, 1)
            .iter()
            .map(|t| (s(varints(t, 1)[0]), s(varints(t, 2)[0])))
            .collect();
        assert_eq!(
            types,
            [("inuse_objects", "count"), ("inuse_space", "bytes")]
        );
        assert_eq!(s(varints(&profile, 14)[0]), "inuse_space");
        let period_type = &messages(&profile, 11)[0];
        assert_eq!(
            (s(varints(period_type, 1)[0]), s(varints(period_type, 2)[0])),
            ("space", "bytes")
        );
        assert_eq!(varints(&profile, 12), [512 << 10]);
        assert_eq!(s(varints(&profile, 13)[0]), "tenant 7");

        // Functions by id, then locations by id.
        let functions: HashMap<u64, &str> = messages(&profile, 5)
            .iter()
            .map(|f| (varints(f, 1)[0], s(varints(f, 2)[0])))
            .collect();
        assert_eq!(functions.len(), 4);
        let locations: HashMap<u64, Location<'_>> = messages(&profile, 4)
            .iter()
            .map(|l| {
                let lines = messages(l, 4)
                    .iter()
                    .map(|line| (functions[&varints(line, 1)[0]], varints(line, 2)[0]))
                    .collect();
                (varints(l, 1)[0], (varints(l, 3)[0], lines))
            })
            .collect();
        assert_eq!(locations.len(), 3, "one location per address");

        let samples = messages(&profile, 2);
        let stacks: Vec<Vec<&Location<'_>>> = samples
            .iter()
            .map(|sample| varints(sample, 1).iter().map(|id| &locations[id]).collect())
            .collect();
        let alpha = (
            0x2000,
            vec![
                ("my_crate::inner", 0x2000),
                ("my_crate::site_alpha", 0x2000),
            ],
        );
        let beta = (0x3000, vec![("my_crate::site_beta", 0x3000)]);
        let main = (0x1000, vec![("my_crate::main", 0x1000)]);
        assert_eq!(stacks, [vec![&alpha, &main], vec![&beta, &main]]);
        let values: Vec<Vec<u64>> = samples.iter().map(|sample| varints(sample, 2)).collect();
        assert_eq!(values, [vec![31, 3_000_000], vec![10, 1_000_000]]);
    }

    #[test]
    fn varints_round_trip() {
        for value in [0, 1, 127, 128, 300, 1 << 35, u64::MAX, -1i64 as u64] {
            let mut buf = Vec::new();
            put_varint(&mut buf, value);
            let mut read = &buf[..];
            assert_eq!(get_varint(&mut read), value);
            assert!(read.is_empty());
        }
        let mut buf = Vec::new();
        put_varint(&mut buf, 300);
        assert_eq!(
            buf,
            [0xac, 0x02],
            "the example of protobuf.dev's encoding guide"
        );
    }

    #[test]
    fn go_tool_pprof_reads_the_profile() {
        let go_found = Command::new("go").arg("version").output().is_ok();
        assert!(
            go_found,
            "`go` is not on PATH: install golang-go (apt-get install -y golang-go) to run \
             this test, which checks the output with `go tool pprof`"
        );
        let path = std::env::temp_dir().join(format!(
            "beancounter-pprof-test-{}.pb.gz",
            std::process::id()
        ));
        std::fs::write(&path, alpha_beta_profile().pprof()).expect("write the profile");
        let output = Command::new("go")
            .args(["tool", "pprof", "-top"])
            .arg(&path)
            .output()
            .expect("run go tool pprof");
        std::fs::remove_file(&path).expect("remove the profile");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "go tool pprof failed:\n{stdout}\n{stderr}"
        );
        println!("{stdout}");
        for name in [
            "my_crate::site_alpha",
            "my_crate::site_beta",
            "my_crate::inner",
        ] {
            assert!(
                stdout.contains(name),
                "{name} missing from:\n{stdout}\n{stderr}"
            );
        }
        assert!(stdout.contains("inuse_space"), "{stdout}");
    }
}
