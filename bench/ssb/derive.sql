-- Star Schema Benchmark tables derived from TPC-H tables (DuckDB SQL; the TPC-H tables are
-- loaded first). The mapping follows SSB's definitions: dates as yyyymmdd keys, discounts and
-- taxes in percent, cities as the first nine letters of the nation plus a digit, part categories
-- and brands from TPC-H's manufacturer and brand.
CREATE SCHEMA IF NOT EXISTS ssb;

CREATE TABLE ssb.dwdate AS
SELECT CAST(strftime(d, '%Y%m%d') AS INTEGER) AS d_datekey,
       strftime(d, '%B %-d, %Y') AS d_date,
       strftime(d, '%A') AS d_dayofweek,
       strftime(d, '%B') AS d_month,
       CAST(year(d) AS INTEGER) AS d_year,
       CAST(year(d) * 100 + month(d) AS INTEGER) AS d_yearmonthnum,
       strftime(d, '%b%Y') AS d_yearmonth,
       CAST(isodow(d) AS INTEGER) AS d_daynuminweek,
       CAST(day(d) AS INTEGER) AS d_daynuminmonth,
       CAST(dayofyear(d) AS INTEGER) AS d_daynuminyear,
       CAST(month(d) AS INTEGER) AS d_monthnuminyear,
       CAST((dayofyear(d) - 1) // 7 + 1 AS INTEGER) AS d_weeknuminyear,
       CASE WHEN month(d) IN (12, 1, 2) THEN 'Winter' WHEN month(d) IN (3, 4, 5) THEN 'Spring'
            WHEN month(d) IN (6, 7, 8) THEN 'Summer' ELSE 'Fall' END AS d_sellingseason,
       isodow(d) = 7 AS d_lastdayinweekfl,
       day(d + INTERVAL 1 DAY) = 1 AS d_lastdayinmonthfl,
       (month(d) = 12 AND day(d) = 25) OR (month(d) = 1 AND day(d) = 1) AS d_holidayfl,
       isodow(d) <= 5 AS d_weekdayfl
FROM (SELECT CAST(range AS DATE) AS d FROM range(DATE '1992-01-01', DATE '1999-01-01', INTERVAL 1 DAY));

CREATE TABLE ssb.customer AS
SELECT c_custkey, c_name, c_address,
       rpad(substr(n_name, 1, 9), 9, ' ') || CAST(c_custkey % 10 AS VARCHAR) AS c_city,
       n_name AS c_nation, r_name AS c_region, c_phone, c_mktsegment
FROM customer JOIN nation ON c_nationkey = n_nationkey JOIN region ON n_regionkey = r_regionkey;

CREATE TABLE ssb.supplier AS
SELECT s_suppkey, s_name, s_address,
       rpad(substr(n_name, 1, 9), 9, ' ') || CAST(s_suppkey % 10 AS VARCHAR) AS s_city,
       n_name AS s_nation, r_name AS s_region, s_phone
FROM supplier JOIN nation ON s_nationkey = n_nationkey JOIN region ON n_regionkey = r_regionkey;

CREATE TABLE ssb.part AS
SELECT p_partkey, p_name, 'MFGR#' || substr(p_mfgr, 14) AS p_mfgr,
       'MFGR#' || substr(p_brand, 7, 2) AS p_category,
       'MFGR#' || substr(p_brand, 7, 2) || CAST(p_partkey % 40 + 1 AS VARCHAR) AS p_brand1,
       split_part(p_name, ' ', 1) AS p_color, p_type, p_size, p_container
FROM part;

CREATE TABLE ssb.lineorder AS
SELECT l_orderkey AS lo_orderkey, l_linenumber AS lo_linenumber, o_custkey AS lo_custkey,
       l_partkey AS lo_partkey, l_suppkey AS lo_suppkey,
       CAST(strftime(o_orderdate, '%Y%m%d') AS INTEGER) AS lo_orderdate,
       o_orderpriority AS lo_orderpriority, o_shippriority AS lo_shippriority,
       CAST(l_quantity AS INTEGER) AS lo_quantity, l_extendedprice AS lo_extendedprice,
       o_totalprice AS lo_ordtotalprice, CAST(round(l_discount * 100) AS INTEGER) AS lo_discount,
       round(l_extendedprice * (1 - l_discount), 2) AS lo_revenue, ps_supplycost AS lo_supplycost,
       CAST(round(l_tax * 100) AS INTEGER) AS lo_tax,
       CAST(strftime(l_commitdate, '%Y%m%d') AS INTEGER) AS lo_commitdate, l_shipmode AS lo_shipmode
FROM lineitem JOIN orders ON l_orderkey = o_orderkey
     JOIN partsupp ON ps_partkey = l_partkey AND ps_suppkey = l_suppkey;

-- The denormalized form: every dimension column the queries use, on each line.
CREATE TABLE ssb.lineorder_flat AS
SELECT lo.*, c_city, c_nation, c_region, s_city, s_nation, s_region, p_mfgr, p_category, p_brand1,
       d_year, d_yearmonthnum, d_yearmonth, d_weeknuminyear
FROM ssb.lineorder lo
     JOIN ssb.customer ON lo_custkey = c_custkey
     JOIN ssb.supplier ON lo_suppkey = s_suppkey
     JOIN ssb.part ON lo_partkey = p_partkey
     JOIN ssb.dwdate ON lo_orderdate = d_datekey;
