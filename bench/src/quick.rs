//! `--quick`: every benchmark binary's smoke run (`make bench BENCH_ARGS=--quick`).
//!
//! Each binary keeps one list of its quick defaults, `(argument id, value)`, next to its clap
//! definition, and parses its command line with [`parse`]: with `--quick` on the command line
//! those values replace clap's defaults (an explicit flag still wins), and `--help` shows both.
//! Every list sets `out` to [`QUICK_RESULTS`], so a quick run never overwrites the full run's
//! results in [`RESULTS`].

use std::ffi::OsString;

use clap::{Command, Parser};

/// Where the full run writes: the committed results.
pub const RESULTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/results");
/// Where a quick run writes (git-ignored).
pub const QUICK_RESULTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/results/quick");

/// The flag, in every binary's arguments as `quick: bool`.
pub const FLAG: &str = "--quick";

/// [`parse_from`] the process's arguments; exits with clap's message on an error.
pub fn parse<T: Parser>(quick: &[(&str, &'static str)]) -> T {
    parse_from(std::env::args_os(), quick)
}

/// Parses `args` into `T`. With `--quick` among them, each `(id, value)` of `quick` becomes the
/// default of the argument `id` (the field's name) of the command and of every subcommand that
/// has it. Panics if no command has an argument `id` (a typo in a binary's list).
pub fn parse_from<T, I, A>(args: I, quick: &[(&str, &'static str)]) -> T
where
    T: Parser,
    I: IntoIterator<Item = A>,
    A: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let on = args.iter().skip(1).any(|a| a == FLAG);
    let mut cmd = T::command();
    for (id, value) in quick {
        let (found, with) = set_default(cmd, id, value, on);
        assert!(found, "--quick default for `{id}`: no such argument");
        cmd = with;
    }
    let matches = cmd.get_matches_from(args);
    T::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Notes `value` in the help of argument `id` of `cmd` and its subcommands, and makes it the
/// default when `on`; `found`: some command has it.
fn set_default(mut cmd: Command, id: &str, value: &'static str, on: bool) -> (bool, Command) {
    let mut found = false;
    if cmd.get_arguments().any(|a| a.get_id() == id) {
        found = true;
        cmd = cmd.mut_arg(id, |a| {
            let note = |h: Option<&clap::builder::StyledStr>| match h {
                Some(h) => format!("{h} [{FLAG}: {value}]"),
                None => format!("[{FLAG}: {value}]"),
            };
            let help = note(a.get_help());
            let long = a.get_long_help().map(|h| note(Some(h)));
            let mut a = a.help(help);
            if let Some(long) = long {
                a = a.long_help(long);
            }
            if on { a.default_value(value) } else { a }
        });
    }
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in subs {
        let mut sub_found = false;
        cmd = cmd.mut_subcommand(&name, |s| {
            let (f, s) = set_default(s, id, value, on);
            sub_found = f;
            s
        });
        found |= sub_found;
    }
    (found, cmd)
}

/// The help of every binary's `quick` flag.
pub const HELP: &str = "A smoke run: few rounds, short runs, small sizes (each option's help gives \
                        its --quick value); results in bench/results/quick, not bench/results";

#[cfg(test)]
mod tests {
    use clap::{Args, CommandFactory, Subcommand};

    use super::*;

    #[derive(Parser, Debug)]
    #[command(args_conflicts_with_subcommands = true)]
    struct Cli {
        #[command(subcommand)]
        cmd: Option<Cmd>,
        #[command(flatten)]
        run: RunArgs,
    }

    #[derive(Subcommand, Debug)]
    enum Cmd {
        Run(RunArgs),
        Other,
    }

    #[derive(Args, Debug)]
    struct RunArgs {
        /// Rounds.
        #[arg(long, default_value_t = 4)]
        rounds: usize,
        #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
        sizes: Vec<usize>,
        #[arg(long, default_value = RESULTS)]
        out: String,
        #[arg(long)]
        quick: bool,
    }

    const QUICK: &[(&str, &str)] = &[("rounds", "1"), ("sizes", "1,10"), ("out", QUICK_RESULTS)];

    fn run(args: &[&str]) -> RunArgs {
        let cli: Cli = parse_from(args, QUICK);
        match cli.cmd {
            Some(Cmd::Run(r)) => r,
            _ => cli.run,
        }
    }

    #[test]
    fn quick_replaces_defaults_only() {
        let full = run(&["b"]);
        assert_eq!(
            (full.rounds, full.sizes, full.quick),
            (4, vec![1, 1000, 10000], false)
        );
        assert_eq!(full.out, RESULTS);
        let q = run(&["b", "--quick"]);
        assert_eq!((q.rounds, q.sizes, q.quick), (1, vec![1, 10], true));
        assert_eq!(q.out, QUICK_RESULTS);
        // An explicit flag wins, before or after --quick.
        let q = run(&["b", "--rounds", "3", "--quick", "--out", "/tmp/x"]);
        assert_eq!((q.rounds, q.out.as_str()), (3, "/tmp/x"));
        // The subcommand's copy of the arguments too.
        let q = run(&["b", "run", "--quick"]);
        assert_eq!((q.rounds, q.quick), (1, true));
    }

    #[test]
    fn help_shows_the_quick_value() {
        let mut cmd = Cli::command();
        let (found, with) = set_default(cmd, "rounds", "1", false);
        assert!(found);
        cmd = with;
        let help = cmd.render_help().to_string();
        assert!(help.contains("Rounds [--quick: 1] [default: 4]"), "{help}");
        assert!(help.contains("[default: 4]"), "{help}");
    }

    #[test]
    #[should_panic(expected = "no such argument")]
    fn a_typo_in_the_list_is_caught() {
        let _: Cli = parse_from(["b"], &[("roundz", "1")]);
    }
}
