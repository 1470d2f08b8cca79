//! `regobox config`: layering order, environment overrides, `--origin`, and bad configuration
//! reported all at once with exit code 78, through the real binary.

use crate::support::*;

#[test]
fn layers_merge_in_file_name_order_across_directories_and_env_wins() {
    let inst = Instance::new();
    // The image's directory and the user's mounted one.
    let image = inst.dir.path().join("image-config");
    std::fs::create_dir_all(&image).unwrap();
    std::fs::write(
        image.join("50_default.toml"),
        "[postgres]\ndatabase = \"regovar\"\nuser = \"regovar\"\nlisten = \"127.0.0.1\"\n",
    )
    .unwrap();
    inst.config_file(
        "10_low.toml",
        "[postgres]\ndatabase = \"low\"\nlocale = \"C\"\n",
    );
    inst.config_file("90_override.toml", "[postgres]\nuser = \"override\"\n");
    let dirs = format!("{}:{}", image.display(), inst.config_dir.display());
    // Both directories through REGOBOX_CONFIG_DIR, `:`-separated, as the image sets it.
    let out = std::process::Command::new(BIN)
        .args(["config", "--origin"])
        .env("REGOBOX_CONFIG_DIR", &dirs)
        .env("REGOBOX_POSTGRES__LISTEN", "*")
        .env("REGOBOX_POSTGRES__PASSWORD", "s3cret-value")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    // The line of `key` in the [postgres] section.
    let line = |key: &str| {
        text.lines()
            .skip_while(|l| *l != "[postgres]")
            .take_while(|l| !l.is_empty())
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no postgres.{key} in:\n{text}"))
            .to_string()
    };
    let default_file = image.join("50_default.toml").display().to_string();
    assert_eq!(
        line("database"),
        format!("database = \"regovar\"  # file {default_file}"),
        "50_default beats 10_low"
    );
    assert_eq!(
        line("user"),
        format!(
            "user = \"override\"  # file {}",
            inst.config_dir.join("90_override.toml").display()
        )
    );
    assert_eq!(
        line("locale"),
        format!(
            "locale = \"C\"  # file {}",
            inst.config_dir.join("10_low.toml").display()
        ),
        "a key only the low file sets is kept"
    );
    assert_eq!(
        line("listen"),
        "listen = \"*\"  # environment variable REGOBOX_POSTGRES__LISTEN"
    );
    assert_eq!(line("port"), "port = 5432  # default");
    assert_eq!(
        line("data_dir"),
        "data_dir = \"/volumes/db/pgdata\"  # default (derived from volumes.root)"
    );
    assert!(!text.contains("s3cret-value"), "secret printed:\n{text}");
    assert!(
        line("password").starts_with("password = \"<redacted>\""),
        "{text}"
    );

    // Without --origin the output is plain TOML.
    let plain = std::process::Command::new(BIN)
        .args(["config"])
        .env("REGOBOX_CONFIG_DIR", &dirs)
        .output()
        .unwrap();
    let parsed: toml::Table = stdout(&plain).parse().expect("valid TOML");
    assert_eq!(parsed["postgres"]["database"].as_str(), Some("regovar"));
}

#[test]
fn every_bad_key_is_reported_at_once_with_exit_code_78() {
    let inst = Instance::new();
    inst.config_file(
        "50_a.toml",
        "[postgres]\nprot = 5433\nlisten = [1, 2]\nmode = \"sideways\"\n",
    );
    inst.config_file("60_b.toml", "[postgress]\nport = 1\n");
    inst.config_file("70_c.toml", "[postgres\nport = 1\n");
    inst.config_file(
        "80_d.toml",
        "[postgres]\nstart_timeout = \"0s\"\n[postgres.settings]\nfsync = \"off\"\n",
    );
    for command in ["config", "run", "init", "psql"] {
        let out = inst
            .command(&[command])
            .env("REGOBOX_POSTGRES__STOP_TIMEOUT", "whenever")
            .env("REGOBOX_VOLUMES__ROOTT", "/x")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "{command}: {}", stderr(&out));
        let err = stderr(&out);
        let file = |n: &str| inst.config_dir.join(n).display().to_string();
        for (origin, key) in [
            (file("50_a.toml"), "postgres.prot"),
            (file("50_a.toml"), "postgres.listen"),
            (file("50_a.toml"), "postgres.mode"),
            (file("60_b.toml"), "postgress"),
            (file("80_d.toml"), "postgres.start_timeout"),
            (file("80_d.toml"), "postgres.settings.fsync"),
            (
                "environment variable REGOBOX_POSTGRES__STOP_TIMEOUT".to_string(),
                "postgres.stop_timeout",
            ),
            (
                "environment variable REGOBOX_VOLUMES__ROOTT".to_string(),
                "volumes.roott",
            ),
        ] {
            let wanted = format!("{origin}: key `{key}`");
            assert!(
                err.lines().any(|l| l.contains(&wanted)),
                "{command}: no line with {wanted:?} in:\n{err}"
            );
        }
        assert!(
            err.contains(&format!("{}: not valid TOML (line 1)", file("70_c.toml"))),
            "{err}"
        );
        assert!(err.contains("(9 problems)"), "{err}");
        // Nothing was created on the volume.
        assert!(!inst.root.exists(), "{command} touched the volume");
    }
}

#[test]
fn an_environment_variable_overrides_a_single_key() {
    let inst = Instance::new();
    inst.config_file(
        "50_default.toml",
        "[postgres]\nport = 6000\ndatabase = \"keep\"\n",
    );
    let out = inst.ok(&["config", "--origin"]);
    let text = stdout(&out);
    // `command` sets REGOBOX_POSTGRES__PORT to the instance's port: the variable wins.
    assert!(
        text.contains(&format!(
            "port = {}  # environment variable REGOBOX_POSTGRES__PORT",
            inst.port
        )),
        "{text}"
    );
    assert!(text.contains("database = \"keep\"  # file "), "{text}");
}
