//! Which traces are kept: the standard `OTEL_TRACES_SAMPLER` and
//! `OTEL_TRACES_SAMPLER_ARG` variables, or the `--sample-ratio` flag that wins over
//! them, checked once at start-up.
use crate::{sampling::threshold::Threshold, usage::UsageError};

/// The sampler in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampler {
    /// Every trace (the default).
    AlwaysOn,
    /// No trace: connection metrics only.
    AlwaysOff,
    /// Traces kept with a probability, consistently (by trace id).
    Ratio(Threshold),
}

const SAMPLERS: &str = "always_on, always_off, traceidratio, parentbased_always_on, \
                        parentbased_always_off, parentbased_traceidratio";

/// The sampler from the flag, else from the environment `env` reads.
pub fn sampler_from(
    ratio_flag: Option<f64>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Sampler, UsageError> {
    if let Some(p) = ratio_flag {
        return Ok(Sampler::Ratio(Threshold::from_probability(p)));
    }
    let nonempty = |name| env(name).filter(|v| !v.trim().is_empty());
    let Some(name) = nonempty("OTEL_TRACES_SAMPLER") else {
        return Ok(Sampler::AlwaysOn);
    };
    // A socket has no parent: the parent-based samplers act as their root sampler.
    match name.trim().to_ascii_lowercase().as_str() {
        "always_on" | "parentbased_always_on" => Ok(Sampler::AlwaysOn),
        "always_off" | "parentbased_always_off" => Ok(Sampler::AlwaysOff),
        "traceidratio" | "parentbased_traceidratio" => {
            // The specification's default argument: 1.0.
            let p = match nonempty("OTEL_TRACES_SAMPLER_ARG") {
                None => 1.0,
                Some(arg) => parse_ratio(&arg)
                    .map_err(|why| UsageError(format!("OTEL_TRACES_SAMPLER_ARG='{arg}' {why}")))?,
            };
            Ok(Sampler::Ratio(Threshold::from_probability(p)))
        }
        _ => Err(UsageError(format!(
            "OTEL_TRACES_SAMPLER='{name}' is not supported; use one of {SAMPLERS}"
        ))),
    }
}

/// A probability in [0, 1], as `--sample-ratio` and `OTEL_TRACES_SAMPLER_ARG` take it.
pub fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err("is not a probability from 0 to 1 (e.g. 0.01 keeps 1%)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<Sampler, UsageError> {
        sampler_from(None, |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn the_standard_samplers() {
        let ratio = |p| Ok(Sampler::Ratio(Threshold::from_probability(p)));
        assert_eq!(from(&[]), Ok(Sampler::AlwaysOn));
        assert_eq!(from(&[("OTEL_TRACES_SAMPLER", "")]), Ok(Sampler::AlwaysOn));
        assert_eq!(
            from(&[("OTEL_TRACES_SAMPLER", "always_on")]),
            Ok(Sampler::AlwaysOn)
        );
        assert_eq!(
            from(&[("OTEL_TRACES_SAMPLER", "parentbased_always_off")]),
            Ok(Sampler::AlwaysOff)
        );
        assert_eq!(from(&[("OTEL_TRACES_SAMPLER", "traceidratio")]), ratio(1.0));
        assert_eq!(
            from(&[
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25")
            ]),
            ratio(0.25)
        );
        // The flag wins.
        let flag = sampler_from(Some(0.5), |_| Some("always_off".into()));
        assert_eq!(flag, ratio(0.5));
    }

    #[test]
    fn bad_values_say_what_is_accepted() {
        let err = from(&[("OTEL_TRACES_SAMPLER", "jaeger_remote")]).unwrap_err();
        assert_eq!(
            err.0,
            format!("OTEL_TRACES_SAMPLER='jaeger_remote' is not supported; use one of {SAMPLERS}")
        );
        for arg in ["1.5", "-0.1", "abc", "NaN"] {
            let err = from(&[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", arg),
            ])
            .unwrap_err();
            assert!(
                err.0.starts_with(&format!(
                    "OTEL_TRACES_SAMPLER_ARG='{arg}' is not a probability"
                )),
                "{err}"
            );
        }
    }
}
