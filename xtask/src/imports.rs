//! `cargo xtask imports`: which file of `probe-user/src` uses which, read
//! from their `use` items and paths (`crate::`, `super::`, `self::`, a child
//! module's name), outside `#[cfg(test)]` items. Fails on an import circle
//! between files, and on one between the top-level folders (the direction
//! `lib.rs` states: one folder per concern, imports one way).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use syn::visit::Visit;

/// A module's path from the crate root (`["serve", "console"]`).
type ModulePath = Vec<String>;

pub fn run(verbose: bool) -> Result<()> {
    let src = crate::cmd::workspace_root().join("probe-user/src");
    let files = modules_under(&src)?;
    let known: BTreeSet<ModulePath> = files.keys().cloned().collect();
    let mut read = BTreeMap::new();
    for (module, file) in &files {
        let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let syntax = syn::parse_file(&text).with_context(|| format!("parsing {}", file.display()))?;
        let mut paths = Paths::default();
        paths.visit_file(&syntax);
        read.insert(module.clone(), paths);
    }
    // What each module re-exports (`pub use child::Item`): a path through
    // the re-export names the file that defines the item.
    let mut exports: Exports = BTreeMap::new();
    for (module, paths) in &read {
        for path in &paths.exported {
            if let (Some(item), Some((target, rest))) = (path.last(), resolve(module, path, &known))
                && rest.len() == 1
                && &target != module
            {
                exports.entry(module.clone()).or_default().insert(item.clone(), target);
            }
        }
    }
    let mut graph: BTreeMap<ModulePath, BTreeSet<ModulePath>> = BTreeMap::new();
    for (module, paths) in &read {
        let targets = graph.entry(module.clone()).or_default();
        for path in &paths.found {
            if let Some(target) = resolve(module, path, &known).map(|found| through_exports(found, &exports))
                && &target != module
                && !target.is_empty()
            {
                targets.insert(target);
            }
        }
    }
    if verbose {
        for (module, targets) in &graph {
            let targets: Vec<String> = targets.iter().map(|t| name(t)).collect();
            println!("{} -> {}", name(module), targets.join(", "));
        }
    }
    let mut problems = Vec::new();
    for circle in circles(&graph) {
        problems.push(format!(
            "files import each other: {}",
            circle.iter().map(|m| name(m)).collect::<Vec<_>>().join(", ")
        ));
    }
    // The same at the level of the top-level folders (and files) of src/.
    let mut folders: BTreeMap<ModulePath, BTreeSet<ModulePath>> = BTreeMap::new();
    for (module, targets) in graph.iter().filter(|(module, _)| !module.is_empty()) {
        let from = module[..1].to_vec();
        let entry = folders.entry(from.clone()).or_default();
        entry.extend(targets.iter().map(|t| t[..1].to_vec()).filter(|to| *to != from));
    }
    for circle in circles(&folders) {
        let members: Vec<String> = circle.iter().map(|m| name(m)).collect();
        let why: Vec<String> = graph
            .iter()
            .flat_map(|(from, targets)| targets.iter().map(move |to| (from, to)))
            .filter(|(from, to)| {
                from[0] != to[0] && circle.contains(&from[..1].to_vec()) && circle.contains(&to[..1].to_vec())
            })
            .map(|(from, to)| format!("{} -> {}", name(from), name(to)))
            .collect();
        problems.push(format!("folders import each other: {} ({})", members.join(", "), why.join("; ")));
    }
    if !problems.is_empty() {
        bail!("imports run both ways in probe-user/src:\n  {}", problems.join("\n  "));
    }
    println!("imports: {} files of probe-user/src, no circle between files or folders", graph.len());
    Ok(())
}

fn name(module: &[String]) -> String {
    if module.is_empty() { "crate".into() } else { module.join("::") }
}

/// Every module file under `src` (the library's: `main.rs` is the binary),
/// by module path.
fn modules_under(src: &Path) -> Result<BTreeMap<ModulePath, PathBuf>> {
    let mut found = BTreeMap::new();
    let mut pending = vec![src.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "rs") || path == src.join("main.rs") {
                continue;
            }
            let relative = path.strip_prefix(src).expect("under src");
            let mut module: ModulePath = relative
                .parent()
                .into_iter()
                .flat_map(|p| p.iter())
                .map(|s| s.to_string_lossy().into_owned())
                .collect();
            let stem = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
            if stem != "mod" && stem != "lib" {
                module.push(stem);
            }
            found.insert(module, path);
        }
    }
    Ok(found)
}

/// Per module, the items it re-exports and the module each comes from.
type Exports = BTreeMap<ModulePath, BTreeMap<String, ModulePath>>;

/// The module that defines what `found` names: past the re-exports.
fn through_exports((mut module, mut rest): (ModulePath, Vec<String>), exports: &Exports) -> ModulePath {
    // Bounded: a re-export may name another, never in a loop that matters.
    for _ in 0..8 {
        let Some(target) = rest.first().and_then(|item| exports.get(&module)?.get(item)) else { break };
        module = target.clone();
        rest = rest[1..].to_vec();
        if rest.is_empty() {
            break;
        }
    }
    module
}

/// The module file a path used in `from` names, if it is one of ours, and
/// the segments after it.
fn resolve(from: &ModulePath, path: &[String], known: &BTreeSet<ModulePath>) -> Option<(ModulePath, Vec<String>)> {
    let (mut absolute, rest) = match path.first().map(String::as_str) {
        Some("crate") => (Vec::new(), &path[1..]),
        Some("self") => (from.clone(), &path[1..]),
        Some("super") => {
            let supers = path.iter().take_while(|s| *s == "super").count();
            (from[..from.len().checked_sub(supers)?].to_vec(), &path[supers..])
        }
        // A child module's name, as `mod pages;` then `use pages::X` has it.
        Some(first) if known.contains(&[from.as_slice(), &[first.to_string()]].concat()) => (from.clone(), path),
        _ => return None,
    };
    let mut best = known.contains(&absolute).then(|| (absolute.clone(), rest.to_vec()));
    for (at, segment) in rest.iter().enumerate() {
        absolute.push(segment.clone());
        if known.contains(&absolute) {
            best = Some((absolute.clone(), rest[at + 1..].to_vec()));
        }
    }
    best
}

/// The paths a file names outside `#[cfg(test)]` items: each `use` tree
/// flattened, and every path in its code.
#[derive(Default)]
struct Paths {
    found: Vec<Vec<String>>,
    /// The paths of its `pub use` items (re-exports).
    exported: Vec<Vec<String>>,
}

impl Paths {
    fn flatten(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(path) => {
                prefix.push(path.ident.to_string());
                self.flatten(prefix, &path.tree);
                prefix.pop();
            }
            syn::UseTree::Name(name) => self.found.push([prefix.as_slice(), &[name.ident.to_string()]].concat()),
            syn::UseTree::Rename(rename) => {
                self.found.push([prefix.as_slice(), &[rename.ident.to_string()]].concat());
            }
            syn::UseTree::Glob(_) => self.found.push(prefix.clone()),
            syn::UseTree::Group(group) => {
                for tree in &group.items {
                    self.flatten(prefix, tree);
                }
            }
        }
    }
}

fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| {
        attr.path().is_ident("cfg") && attr.parse_args::<syn::Meta>().is_ok_and(|meta| meta.path().is_ident("test"))
    })
}

impl<'ast> Visit<'ast> for Paths {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs = match item {
            syn::Item::Mod(item) => &item.attrs,
            syn::Item::Fn(item) => &item.attrs,
            syn::Item::Use(item) => &item.attrs,
            syn::Item::Impl(item) => &item.attrs,
            syn::Item::Struct(item) => &item.attrs,
            syn::Item::Enum(item) => &item.attrs,
            syn::Item::Const(item) => &item.attrs,
            syn::Item::Static(item) => &item.attrs,
            _ => return syn::visit::visit_item(self, item),
        };
        if !is_test_only(attrs) {
            syn::visit::visit_item(self, item);
        }
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        let before = self.found.len();
        self.flatten(&mut Vec::new(), &item.tree);
        if matches!(item.vis, syn::Visibility::Public(_) | syn::Visibility::Restricted(_)) {
            let exported = self.found[before..].to_vec();
            self.exported.extend(exported);
        }
    }

    /// `pub(super)` names no import.
    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {}

    fn visit_path(&mut self, path: &'ast syn::Path) {
        self.found.push(path.segments.iter().map(|s| s.ident.to_string()).collect());
        syn::visit::visit_path(self, path);
    }
}

/// The strongly connected groups of more than one node (Tarjan's algorithm).
fn circles(graph: &BTreeMap<ModulePath, BTreeSet<ModulePath>>) -> Vec<Vec<ModulePath>> {
    struct Tarjan<'a> {
        graph: &'a BTreeMap<ModulePath, BTreeSet<ModulePath>>,
        index: BTreeMap<&'a ModulePath, usize>,
        low: BTreeMap<&'a ModulePath, usize>,
        stack: Vec<&'a ModulePath>,
        on_stack: BTreeSet<&'a ModulePath>,
        found: Vec<Vec<ModulePath>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, node: &'a ModulePath) {
            let next = self.index.len();
            self.index.insert(node, next);
            self.low.insert(node, next);
            self.stack.push(node);
            self.on_stack.insert(node);
            for target in self.graph.get(node).into_iter().flatten() {
                let Some((target, _)) = self.graph.get_key_value(target) else { continue };
                if !self.index.contains_key(target) {
                    self.visit(target);
                    let low = self.low[node].min(self.low[target]);
                    self.low.insert(node, low);
                } else if self.on_stack.contains(target) {
                    let low = self.low[node].min(self.index[target]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let mut group = Vec::new();
                while let Some(member) = self.stack.pop() {
                    self.on_stack.remove(member);
                    group.push(member.clone());
                    if member == node {
                        break;
                    }
                }
                if group.len() > 1 {
                    group.sort();
                    self.found.push(group);
                }
            }
        }
    }
    let mut tarjan = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !tarjan.index.contains_key(node) {
            tarjan.visit(node);
        }
    }
    tarjan.found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(text: &str) -> ModulePath {
        if text.is_empty() { Vec::new() } else { text.split("::").map(str::to_string).collect() }
    }

    #[test]
    fn paths_resolve_to_the_deepest_module_file_they_name() {
        let known: BTreeSet<ModulePath> =
            ["", "serve", "serve::console", "serve::console::pages", "query", "query::desk"].map(module).into();
        let from = module("serve::console");
        let path = |text: &str| text.split("::").map(str::to_string).collect::<Vec<_>>();
        let file = |text: &str| resolve(&from, &path(text), &known).map(|(module, _)| module);
        assert_eq!(file("crate::query::desk::Desk"), Some(module("query::desk")));
        assert_eq!(file("super::super::query::Request"), Some(module("query")));
        assert_eq!(file("pages::Signed"), Some(module("serve::console::pages")));
        assert_eq!(file("self::pages"), Some(module("serve::console::pages")));
        assert_eq!(file("std::sync::Arc"), None);
        assert_eq!(resolve(&module(""), &path("super::x"), &known), None, "no parent of the root");
        // `query` re-exports `Request` from `query::request`.
        let exports: Exports = [(module("query"), [("Request".to_string(), module("query::request"))].into())].into();
        let found = resolve(&from, &path("crate::query::Request"), &known).unwrap();
        assert_eq!(through_exports(found, &exports), module("query::request"));
    }

    #[test]
    fn a_circle_is_found_and_a_chain_is_not() {
        let graph = |edges: &[(&str, &str)]| {
            let mut graph: BTreeMap<ModulePath, BTreeSet<ModulePath>> = BTreeMap::new();
            for (from, to) in edges {
                graph.entry(module(from)).or_default().insert(module(to));
                graph.entry(module(to)).or_default();
            }
            graph
        };
        assert!(circles(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])).is_empty());
        assert_eq!(
            circles(&graph(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")])),
            vec![vec![module("a"), module("b"), module("c")]]
        );
    }

    #[test]
    fn test_only_items_and_external_paths_are_not_imports() {
        let syntax = syn::parse_file(
            "use crate::store::Store;\nfn f() { crate::record::format_time(); }\n#[cfg(test)]\nmod tests { use crate::agent::X; }",
        )
        .unwrap();
        let mut paths = Paths::default();
        paths.visit_file(&syntax);
        let found: Vec<String> = paths.found.iter().map(|p| p.join("::")).collect();
        assert!(found.contains(&"crate::store::Store".to_string()), "{found:?}");
        assert!(found.iter().any(|p| p.starts_with("crate::record::format_time")), "{found:?}");
        assert!(!found.iter().any(|p| p.contains("agent")), "{found:?}");
    }
}
