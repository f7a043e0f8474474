//! Whether a request may be answered at all: who asks must be named, under
//! a configured authority whose kind and purposes allow the act.
use crate::{
    config::{AuthorityKind, Config},
    query::request::{Act, Sweeper, Who},
};

/// Why a request is refused: the command line exits 3, HTTP answers 403.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("refused: {0}")]
pub struct Refusal(pub String);

pub fn authorise(config: &Config, who: &Who, act: Act) -> Result<(), Refusal> {
    let present = |value: &Option<String>| value.as_deref().is_some_and(|v| !v.trim().is_empty());
    if !present(&who.authority) {
        return Err(Refusal("no --authority named".into()));
    }
    if !present(&who.officer) {
        return Err(Refusal("no --officer named".into()));
    }
    if !present(&who.reference) {
        return Err(Refusal("no authorisation --reference given".into()));
    }
    let name = who.authority.as_deref().unwrap_or_default();
    let Some(authority) = config.authority(name) else {
        return Err(Refusal(format!("authority {name:?} is not configured")));
    };
    match (act, authority.kind) {
        (_, AuthorityKind::LocalGovernment) => {
            Err(Refusal(format!("{name} is a local government authority; local authorities may not acquire ICRs")))
        }
        (_, AuthorityKind::Auditor) => {
            Err(Refusal(format!("{name} is an auditor authority: it reads the audit log, not records")))
        }
        (Act::List, AuthorityKind::Operator) => Ok(()),
        (Act::List, _) => {
            Err(Refusal(format!("{name} is not an operator authority: only an operator may list records")))
        }
        (Act::Ask(_), AuthorityKind::Operator) => Err(Refusal(format!(
            "{name} is an operator authority: it may list records for maintenance, not ask the questions"
        ))),
        (Act::Ask(purpose), _) if !authority.purposes.contains(&purpose) => {
            Err(Refusal(format!("{name} is not authorised for purpose {purpose}")))
        }
        (Act::Ask(_), _) => Ok(()),
    }
}

/// Whether `by` may sweep the records whose audit log lies in a directory
/// owned by `owner`: the agent's own schedule, root, or that owner (the
/// agent's user; a cluster's operator). The members of the query socket's
/// group may ask questions through it; they may not destroy records.
pub fn authorise_sweep(by: &Sweeper, owner: u32) -> Result<(), Refusal> {
    match by {
        Sweeper::Schedule => Ok(()),
        Sweeper::Operator(operator) if operator.uid == 0 || operator.uid == owner => Ok(()),
        Sweeper::Operator(operator) => Err(Refusal(format!(
            "a sweep is an operator's: root or the owner of the store (uid {owner}), not uid {}",
            operator.uid
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Purpose, query::request::Operator};

    fn config() -> Config {
        Config::parse(
            r#"
            [[authority]]
            name = "met-police"
            kind = "police"
            purposes = [1, 2]
            [[authority]]
            name = "borough"
            kind = "local"
            purposes = [1, 2, 3]
            [[authority]]
            name = "noc"
            kind = "operator"
            purposes = [1, 2, 3]
            "#,
        )
        .unwrap()
    }

    fn who(authority: &str) -> Who {
        Who { authority: Some(authority.into()), officer: Some("PC 1234".into()), reference: Some("OP-1".into()) }
    }

    #[test]
    fn authorisation_rules() {
        let c = config();
        assert!(authorise(&c, &who("met-police"), Act::Ask(Purpose::Services)).is_ok());
        let refused = |w: &Who, p| authorise(&c, w, Act::Ask(p)).unwrap_err().0;
        assert!(refused(&who("met-police"), Purpose::Accessed).contains("purpose 3"));
        assert!(refused(&who("borough"), Purpose::Resolve).contains("local authorit"));
        assert!(refused(&who("nca"), Purpose::Resolve).contains("not configured"));
        assert!(refused(&Who { reference: None, ..who("met-police") }, Purpose::Resolve).contains("reference"));
        assert!(
            refused(&Who { officer: Some("  ".into()), ..who("met-police") }, Purpose::Resolve).contains("officer")
        );
        // An operator lists, whatever its purposes say, and asks nothing.
        assert!(authorise(&c, &who("noc"), Act::List).is_ok());
        assert!(refused(&who("noc"), Purpose::Resolve).contains("operator authority"));
        assert!(authorise(&c, &who("met-police"), Act::List).unwrap_err().0.contains("only an operator may list"));
        assert!(authorise(&c, &who("borough"), Act::List).is_err());
        assert!(authorise(&c, &Who { reference: None, ..who("noc") }, Act::List).unwrap_err().0.contains("reference"));
    }

    #[test]
    fn a_sweep_is_for_root_the_owner_and_the_schedule() {
        let operator = |uid| Sweeper::Operator(Operator { uid, sudo_user: None });
        assert!(authorise_sweep(&Sweeper::Schedule, 991).is_ok());
        assert!(authorise_sweep(&operator(0), 991).is_ok());
        assert!(authorise_sweep(&operator(991), 991).is_ok());
        let refused = authorise_sweep(&operator(1000), 991).unwrap_err().0;
        assert!(refused.contains("operator's") && refused.contains("uid 1000"), "{refused}");
    }
}
