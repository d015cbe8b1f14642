//! Distributions for the request mix of `evgrid load` (energy, max power, hours to departure),
//! written on the command line as `30`, `uniform:10..60` or `normal:30,10`. Pure: sampling
//! takes the random generator as an argument, so a seed reproduces a run's requests.

use std::fmt;

use rand::Rng;

/// A distribution of positive values, with the bounds its samples are clamped to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Distribution {
    pub shape: Shape,
    /// Samples below are raised to this (a normal distribution has tails).
    pub min: f64,
    /// Samples above are lowered to this (the API's limit).
    pub max: f64,
}

/// The shape of a [`Distribution`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shape {
    /// Always this value.
    Constant(f64),
    /// Uniform between `low` and `high`, both included.
    Uniform { low: f64, high: f64 },
    /// Normal with this mean and standard deviation.
    Normal { mean: f64, sd: f64 },
}

impl Distribution {
    /// Parses `VALUE`, `uniform:LOW..HIGH` or `normal:MEAN,SD`. A constant, both uniform bounds
    /// and a normal mean must lie in `[min, max]`: a mix the API would refuse is a typo, not a
    /// load to send.
    pub fn parse(s: &str, min: f64, max: f64) -> Result<Self, String> {
        let number = |t: &str| {
            t.trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| format!("{t:?} is not a number"))
        };
        let within = |x: f64, what: &str| {
            if (min..=max).contains(&x) {
                Ok(x)
            } else {
                Err(format!("{what} {x} is outside {min}..{max}"))
            }
        };
        let shape = if let Some(rest) = s.strip_prefix("uniform:") {
            let (low, high) = rest
                .split_once("..")
                .ok_or("expected uniform:LOW..HIGH, e.g. uniform:10..60")?;
            let (low, high) = (within(number(low)?, "low")?, within(number(high)?, "high")?);
            if low > high {
                return Err(format!("uniform:{low}..{high} has low above high"));
            }
            Shape::Uniform { low, high }
        } else if let Some(rest) = s.strip_prefix("normal:") {
            let (mean, sd) = rest
                .split_once(',')
                .ok_or("expected normal:MEAN,SD, e.g. normal:30,10")?;
            let (mean, sd) = (within(number(mean)?, "mean")?, number(sd)?);
            if sd < 0.0 {
                return Err(format!("standard deviation {sd} is negative"));
            }
            Shape::Normal { mean, sd }
        } else {
            Shape::Constant(within(
                number(s).map_err(|_| {
                    format!("expected a number, uniform:LOW..HIGH or normal:MEAN,SD, got {s:?}")
                })?,
                "value",
            )?)
        };
        Ok(Self { shape, min, max })
    }

    /// One sample, clamped to `[min, max]`.
    pub fn sample(&self, rng: &mut impl Rng) -> f64 {
        let x = match self.shape {
            Shape::Constant(x) => x,
            Shape::Uniform { low, high } => rng.random_range(low..=high),
            Shape::Normal { mean, sd } => {
                // Box–Muller: two uniforms give one standard normal. 1 − u keeps ln away from 0.
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random();
                mean + sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            }
        };
        x.clamp(self.min, self.max)
    }
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.shape {
            Shape::Constant(x) => write!(f, "{x}"),
            Shape::Uniform { low, high } => write!(f, "uniform:{low}..{high}"),
            Shape::Normal { mean, sd } => write!(f, "normal:{mean},{sd}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn parse(s: &str) -> Result<Distribution, String> {
        Distribution::parse(s, 0.1, 200.0)
    }

    #[test]
    fn parses_the_three_shapes() {
        assert_eq!(parse("30").unwrap().shape, Shape::Constant(30.0));
        assert_eq!(
            parse("uniform:10..60").unwrap().shape,
            Shape::Uniform {
                low: 10.0,
                high: 60.0
            }
        );
        assert_eq!(
            parse("normal:30,10").unwrap().shape,
            Shape::Normal {
                mean: 30.0,
                sd: 10.0
            }
        );
        assert_eq!(
            parse("uniform:10..60").unwrap().to_string(),
            "uniform:10..60"
        );
    }

    #[test]
    fn refuses_what_the_api_would_refuse() {
        for bad in [
            "0",
            "201",
            "-3",
            "ten",
            "NaN",
            "uniform:60..10",
            "uniform:10",
            "uniform:0..10",
            "normal:30",
            "normal:30,-1",
            "normal:300,1",
            "poisson:3",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn samples_stay_in_bounds_and_follow_the_shape() {
        let mut rng = SmallRng::seed_from_u64(7);
        let uniform = parse("uniform:10..60").unwrap();
        let normal = parse("normal:30,10").unwrap();
        let wide = parse("normal:1,100").unwrap();
        let (mut sum_u, mut sum_n, n) = (0.0, 0.0, 20_000);
        for _ in 0..n {
            let u = uniform.sample(&mut rng);
            assert!((10.0..=60.0).contains(&u));
            sum_u += u;
            sum_n += normal.sample(&mut rng);
            let w = wide.sample(&mut rng);
            assert!((0.1..=200.0).contains(&w), "{w}");
        }
        assert!((sum_u / n as f64 - 35.0).abs() < 0.5);
        assert!((sum_n / n as f64 - 30.0).abs() < 0.5);
        assert_eq!(parse("30").unwrap().sample(&mut rng), 30.0);
    }
}
