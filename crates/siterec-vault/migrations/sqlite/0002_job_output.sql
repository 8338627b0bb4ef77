-- What a job produced, for jobs whose result is a report (verify).
ALTER TABLE jobs ADD COLUMN output TEXT;
