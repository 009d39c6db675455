SELECT d_year, c_nation, sum(lo_revenue - lo_supplycost) AS profit
FROM ssb.lineorder_flat
WHERE c_region = 'AMERICA' AND s_region = 'AMERICA' AND (p_mfgr = 'MFGR#1' OR p_mfgr = 'MFGR#2')
GROUP BY d_year, c_nation
ORDER BY d_year, c_nation
