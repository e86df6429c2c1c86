//! Conversion between seconds since the UNIX epoch and the proleptic Gregorian calendar (UTC,
//! no leap seconds), after Howard Hinnant's `days_from_civil` / `civil_from_days` algorithms
//! (<https://howardhinnant.github.io/date_algorithms.html>): the year is shifted to start on
//! 1 March so the leap day is the last day of the year, and counted in 400-year eras of
//! 146 097 days.

const SECS_PER_DAY: i64 = 86_400;
const DAYS_PER_ERA: i64 = 146_097;
/// Days from 0000-03-01 to 1970-01-01.
const EPOCH_SHIFT: i64 = 719_468;
/// Bound on the seconds accepted by [`DateTime::from_unix`], about ±35 million years: keeps
/// every intermediate value of the algorithms far from overflow whatever the clock says.
const MAX_ABS_SECS: i64 = 1 << 50;

/// A UTC date and time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DateTime {
    pub year: i64,
    /// 1..=12
    pub month: u32,
    /// 1..=31
    pub day: u32,
    /// 0..=23
    pub hour: u32,
    /// 0..=59
    pub minute: u32,
    /// 0..=59
    pub second: u32,
    /// 0 = Sunday ..= 6 = Saturday
    pub weekday: u32,
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

/// Number of days in `month` (1..=12) of `year`; 0 for a month out of range.
pub(crate) fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days since 1970-01-01 of a valid date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    // Month counted from March = 0.
    let shifted_month = i64::from((month + 9) % 12);
    let day_of_year = (153 * shifted_month + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * DAYS_PER_ERA + day_of_era - EPOCH_SHIFT
}

/// (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let days = days + EPOCH_SHIFT;
    let era = days.div_euclid(DAYS_PER_ERA);
    let day_of_era = days - era * DAYS_PER_ERA;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    // In range by construction: day 1..=31, month 1..=12.
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl DateTime {
    /// The calendar date of `secs` seconds since the epoch (clamped to about ±35 million
    /// years).
    pub(crate) fn from_unix(secs: i64) -> Self {
        let secs = secs.clamp(-MAX_ABS_SECS, MAX_ABS_SECS);
        let days = secs.div_euclid(SECS_PER_DAY);
        let second_of_day = secs.rem_euclid(SECS_PER_DAY) as u32;
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: second_of_day / 3600,
            minute: second_of_day / 60 % 60,
            second: second_of_day % 60,
            // 1970-01-01 was a Thursday.
            weekday: (days + 4).rem_euclid(7) as u32,
        }
    }

    /// Seconds since the epoch, or `None` if a field is out of range. `weekday` is ignored.
    pub(crate) fn to_unix(self) -> Option<i64> {
        let valid = (1..=12).contains(&self.month)
            && (1..=days_in_month(self.year, self.month)).contains(&self.day)
            && self.hour < 24
            && self.minute < 60
            && self.second < 60
            && self.year.abs() <= 1_000_000;
        valid.then(|| {
            days_from_civil(self.year, self.month, self.day) * SECS_PER_DAY
                + i64::from(self.hour * 3600 + self.minute * 60 + self.second)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dt(year: i64, month: u32, day: u32, hms: (u32, u32, u32), weekday: u32) -> DateTime {
        DateTime {
            year,
            month,
            day,
            hour: hms.0,
            minute: hms.1,
            second: hms.2,
            weekday,
        }
    }

    #[test]
    fn known_dates_round_trip() {
        // Seconds and weekdays computed independently (Python's datetime).
        let cases = [
            (0, dt(1970, 1, 1, (0, 0, 0), 4)),
            (1_795_449_015, dt(2026, 11, 23, (15, 50, 15), 1)),
            (1_709_208_000, dt(2024, 2, 29, (12, 0, 0), 4)),
            (946_684_799, dt(1999, 12, 31, (23, 59, 59), 5)),
            (946_684_800, dt(2000, 1, 1, (0, 0, 0), 6)),
            (951_782_400, dt(2000, 2, 29, (0, 0, 0), 2)),
            (4_107_542_400, dt(2100, 3, 1, (0, 0, 0), 1)),
            (-1, dt(1969, 12, 31, (23, 59, 59), 3)),
            (-2_208_988_800, dt(1900, 1, 1, (0, 0, 0), 1)),
        ];
        for (secs, date) in cases {
            assert_eq!(DateTime::from_unix(secs), date, "{secs}");
            assert_eq!(date.to_unix(), Some(secs), "{date:?}");
        }
    }

    #[test]
    fn every_day_of_four_centuries_round_trips() {
        let mut previous = DateTime::from_unix(-SECS_PER_DAY);
        for day in 0..DAYS_PER_ERA {
            let date = DateTime::from_unix(day * SECS_PER_DAY);
            assert_eq!(date.to_unix(), Some(day * SECS_PER_DAY));
            assert_eq!(date.weekday, (previous.weekday + 1) % 7);
            previous = date;
        }
        assert_eq!(
            (previous.year, previous.month, previous.day),
            (2369, 12, 31)
        );
    }

    #[test]
    fn invalid_fields_are_rejected() {
        let ok = dt(2023, 2, 28, (23, 59, 59), 0);
        assert!(ok.to_unix().is_some());
        assert_eq!(
            DateTime { day: 29, ..ok }.to_unix(),
            None,
            "2023 is not leap"
        );
        assert_eq!(
            DateTime {
                year: 1900,
                day: 29,
                ..ok
            }
            .to_unix(),
            None
        );
        assert!(DateTime {
            year: 2000,
            day: 29,
            ..ok
        }
        .to_unix()
        .is_some());
        assert_eq!(DateTime { month: 0, ..ok }.to_unix(), None);
        assert_eq!(DateTime { month: 13, ..ok }.to_unix(), None);
        assert_eq!(DateTime { day: 0, ..ok }.to_unix(), None);
        assert_eq!(DateTime { hour: 24, ..ok }.to_unix(), None);
        assert_eq!(DateTime { minute: 60, ..ok }.to_unix(), None);
        assert_eq!(DateTime { second: 60, ..ok }.to_unix(), None);
    }

    #[test]
    fn extreme_inputs_do_not_overflow() {
        for secs in [i64::MIN, i64::MAX, MAX_ABS_SECS + 1, -MAX_ABS_SECS - 1] {
            let date = DateTime::from_unix(secs);
            assert!((1..=12).contains(&date.month));
            assert!(date.to_unix().is_none(), "beyond the supported years");
        }
    }
}
