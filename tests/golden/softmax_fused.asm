program softmax
tensor X input bfloat16[256,512]
tensor Y output bfloat16[256,512]
buffer X_cache sbuf part=0 partitions=128 offset=0 size=1024
buffer mx_cache sbuf part=0 partitions=128 offset=1024 size=512
buffer total_cache sbuf part=0 partitions=128 offset=1536 size=512
buffer mul sbuf part=0 partitions=128 offset=2048 size=512
buffer exp sbuf part=0 partitions=128 offset=2560 size=2048
buffer div sbuf part=0 partitions=128 offset=4608 size=1024
buffer X_cache_1 sbuf part=0 partitions=128 offset=5632 size=1024
buffer mx_cache_1 sbuf part=0 partitions=128 offset=6656 size=512
buffer total_cache_1 sbuf part=0 partitions=128 offset=7168 size=512
buffer mul_1 sbuf part=0 partitions=128 offset=7680 size=512
buffer exp_1 sbuf part=0 partitions=128 offset=8192 size=2048
buffer div_1 sbuf part=0 partitions=128 offset=10240 size=1024
dma.q0 sbuf:X_cache.bfloat16[p0@0][1,8][1,512] <- hbm:X.bfloat16[@0][512,8][1,512]
dma.q1 sbuf:X_cache.bfloat16[p8@0][1,8][1,512] <- hbm:X.bfloat16[@4096][512,8][1,512]
dma.q2 sbuf:X_cache.bfloat16[p16@0][1,8][1,512] <- hbm:X.bfloat16[@8192][512,8][1,512]
dma.q3 sbuf:X_cache.bfloat16[p24@0][1,8][1,512] <- hbm:X.bfloat16[@12288][512,8][1,512]
dma.q4 sbuf:X_cache.bfloat16[p32@0][1,8][1,512] <- hbm:X.bfloat16[@16384][512,8][1,512]
dma.q5 sbuf:X_cache.bfloat16[p40@0][1,8][1,512] <- hbm:X.bfloat16[@20480][512,8][1,512]
dma.q6 sbuf:X_cache.bfloat16[p48@0][1,8][1,512] <- hbm:X.bfloat16[@24576][512,8][1,512]
dma.q7 sbuf:X_cache.bfloat16[p56@0][1,8][1,512] <- hbm:X.bfloat16[@28672][512,8][1,512]
dma.q8 sbuf:X_cache.bfloat16[p64@0][1,8][1,512] <- hbm:X.bfloat16[@32768][512,8][1,512]
dma.q9 sbuf:X_cache.bfloat16[p72@0][1,8][1,512] <- hbm:X.bfloat16[@36864][512,8][1,512]
dma.q10 sbuf:X_cache.bfloat16[p80@0][1,8][1,512] <- hbm:X.bfloat16[@40960][512,8][1,512]
dma.q11 sbuf:X_cache.bfloat16[p88@0][1,8][1,512] <- hbm:X.bfloat16[@45056][512,8][1,512]
dma.q12 sbuf:X_cache.bfloat16[p96@0][1,8][1,512] <- hbm:X.bfloat16[@49152][512,8][1,512]
dma.q13 sbuf:X_cache.bfloat16[p104@0][1,8][1,512] <- hbm:X.bfloat16[@53248][512,8][1,512]
dma.q14 sbuf:X_cache.bfloat16[p112@0][1,8][1,512] <- hbm:X.bfloat16[@57344][512,8][1,512]
dma.q15 sbuf:X_cache.bfloat16[p120@0][1,8][1,512] <- hbm:X.bfloat16[@61440][512,8][1,512]
dma.q0 sbuf:X_cache_1.bfloat16[p0@5632][1,8][1,512] <- hbm:X.bfloat16[@65536][512,8][1,512]
dma.q1 sbuf:X_cache_1.bfloat16[p8@5632][1,8][1,512] <- hbm:X.bfloat16[@69632][512,8][1,512]
dma.q2 sbuf:X_cache_1.bfloat16[p16@5632][1,8][1,512] <- hbm:X.bfloat16[@73728][512,8][1,512]
dma.q3 sbuf:X_cache_1.bfloat16[p24@5632][1,8][1,512] <- hbm:X.bfloat16[@77824][512,8][1,512]
dma.q4 sbuf:X_cache_1.bfloat16[p32@5632][1,8][1,512] <- hbm:X.bfloat16[@81920][512,8][1,512]
dma.q5 sbuf:X_cache_1.bfloat16[p40@5632][1,8][1,512] <- hbm:X.bfloat16[@86016][512,8][1,512]
dma.q6 sbuf:X_cache_1.bfloat16[p48@5632][1,8][1,512] <- hbm:X.bfloat16[@90112][512,8][1,512]
dma.q7 sbuf:X_cache_1.bfloat16[p56@5632][1,8][1,512] <- hbm:X.bfloat16[@94208][512,8][1,512]
dma.q8 sbuf:X_cache_1.bfloat16[p64@5632][1,8][1,512] <- hbm:X.bfloat16[@98304][512,8][1,512]
dma.q9 sbuf:X_cache_1.bfloat16[p72@5632][1,8][1,512] <- hbm:X.bfloat16[@102400][512,8][1,512]
dma.q10 sbuf:X_cache_1.bfloat16[p80@5632][1,8][1,512] <- hbm:X.bfloat16[@106496][512,8][1,512]
dma.q11 sbuf:X_cache_1.bfloat16[p88@5632][1,8][1,512] <- hbm:X.bfloat16[@110592][512,8][1,512]
dma.q12 sbuf:X_cache_1.bfloat16[p96@5632][1,8][1,512] <- hbm:X.bfloat16[@114688][512,8][1,512]
dma.q13 sbuf:X_cache_1.bfloat16[p104@5632][1,8][1,512] <- hbm:X.bfloat16[@118784][512,8][1,512]
dma.q14 sbuf:X_cache_1.bfloat16[p112@5632][1,8][1,512] <- hbm:X.bfloat16[@122880][512,8][1,512]
dma.q15 sbuf:X_cache_1.bfloat16[p120@5632][1,8][1,512] <- hbm:X.bfloat16[@126976][512,8][1,512]
tensor_reduce.pool sbuf:mx_cache.float32[p0@1024][1,128][1,1] <- sbuf:X_cache.bfloat16[p0@0][1,128][1,512] op=max
tensor_scalar.pool sbuf:mul.float32[p0@2048][1,128][1,1] <- sbuf:mx_cache.float32[p0@1024][1,128][1,1] op0=mul scalar0=-1.0
activation.act sbuf:exp.float32[p0@2560][1,128][1,512], sbuf:total_cache.float32[p0@1536][1,128][1,1] <- sbuf:X_cache.bfloat16[p0@0][1,128][1,512], sbuf:mul.float32[p0@2048][1,128][1,1] bias=ap func=exp reduce_op=add scale=1.0
tensor_scalar.dve sbuf:div.bfloat16[p0@4608][1,128][1,512] <- sbuf:exp.float32[p0@2560][1,128][1,512], sbuf:total_cache.float32[p0@1536][1,128][1,1] op0=div reverse0=False scalar0=ap
dma.q0 hbm:Y.bfloat16[@0][512,8][1,512] <- sbuf:div.bfloat16[p0@4608][1,8][1,512]
dma.q1 hbm:Y.bfloat16[@4096][512,8][1,512] <- sbuf:div.bfloat16[p8@4608][1,8][1,512]
dma.q2 hbm:Y.bfloat16[@8192][512,8][1,512] <- sbuf:div.bfloat16[p16@4608][1,8][1,512]
dma.q3 hbm:Y.bfloat16[@12288][512,8][1,512] <- sbuf:div.bfloat16[p24@4608][1,8][1,512]
dma.q4 hbm:Y.bfloat16[@16384][512,8][1,512] <- sbuf:div.bfloat16[p32@4608][1,8][1,512]
dma.q5 hbm:Y.bfloat16[@20480][512,8][1,512] <- sbuf:div.bfloat16[p40@4608][1,8][1,512]
dma.q6 hbm:Y.bfloat16[@24576][512,8][1,512] <- sbuf:div.bfloat16[p48@4608][1,8][1,512]
dma.q7 hbm:Y.bfloat16[@28672][512,8][1,512] <- sbuf:div.bfloat16[p56@4608][1,8][1,512]
dma.q8 hbm:Y.bfloat16[@32768][512,8][1,512] <- sbuf:div.bfloat16[p64@4608][1,8][1,512]
dma.q9 hbm:Y.bfloat16[@36864][512,8][1,512] <- sbuf:div.bfloat16[p72@4608][1,8][1,512]
dma.q10 hbm:Y.bfloat16[@40960][512,8][1,512] <- sbuf:div.bfloat16[p80@4608][1,8][1,512]
dma.q11 hbm:Y.bfloat16[@45056][512,8][1,512] <- sbuf:div.bfloat16[p88@4608][1,8][1,512]
dma.q12 hbm:Y.bfloat16[@49152][512,8][1,512] <- sbuf:div.bfloat16[p96@4608][1,8][1,512]
dma.q13 hbm:Y.bfloat16[@53248][512,8][1,512] <- sbuf:div.bfloat16[p104@4608][1,8][1,512]
dma.q14 hbm:Y.bfloat16[@57344][512,8][1,512] <- sbuf:div.bfloat16[p112@4608][1,8][1,512]
dma.q15 hbm:Y.bfloat16[@61440][512,8][1,512] <- sbuf:div.bfloat16[p120@4608][1,8][1,512]
tensor_reduce.pool sbuf:mx_cache_1.float32[p0@6656][1,128][1,1] <- sbuf:X_cache_1.bfloat16[p0@5632][1,128][1,512] op=max
tensor_scalar.pool sbuf:mul_1.float32[p0@7680][1,128][1,1] <- sbuf:mx_cache_1.float32[p0@6656][1,128][1,1] op0=mul scalar0=-1.0
activation.act sbuf:exp_1.float32[p0@8192][1,128][1,512], sbuf:total_cache_1.float32[p0@7168][1,128][1,1] <- sbuf:X_cache_1.bfloat16[p0@5632][1,128][1,512], sbuf:mul_1.float32[p0@7680][1,128][1,1] bias=ap func=exp reduce_op=add scale=1.0
tensor_scalar.dve sbuf:div_1.bfloat16[p0@10240][1,128][1,512] <- sbuf:exp_1.float32[p0@8192][1,128][1,512], sbuf:total_cache_1.float32[p0@7168][1,128][1,1] op0=div reverse0=False scalar0=ap
dma.q0 hbm:Y.bfloat16[@65536][512,8][1,512] <- sbuf:div_1.bfloat16[p0@10240][1,8][1,512]
dma.q1 hbm:Y.bfloat16[@69632][512,8][1,512] <- sbuf:div_1.bfloat16[p8@10240][1,8][1,512]
dma.q2 hbm:Y.bfloat16[@73728][512,8][1,512] <- sbuf:div_1.bfloat16[p16@10240][1,8][1,512]
dma.q3 hbm:Y.bfloat16[@77824][512,8][1,512] <- sbuf:div_1.bfloat16[p24@10240][1,8][1,512]
dma.q4 hbm:Y.bfloat16[@81920][512,8][1,512] <- sbuf:div_1.bfloat16[p32@10240][1,8][1,512]
dma.q5 hbm:Y.bfloat16[@86016][512,8][1,512] <- sbuf:div_1.bfloat16[p40@10240][1,8][1,512]
dma.q6 hbm:Y.bfloat16[@90112][512,8][1,512] <- sbuf:div_1.bfloat16[p48@10240][1,8][1,512]
dma.q7 hbm:Y.bfloat16[@94208][512,8][1,512] <- sbuf:div_1.bfloat16[p56@10240][1,8][1,512]
dma.q8 hbm:Y.bfloat16[@98304][512,8][1,512] <- sbuf:div_1.bfloat16[p64@10240][1,8][1,512]
dma.q9 hbm:Y.bfloat16[@102400][512,8][1,512] <- sbuf:div_1.bfloat16[p72@10240][1,8][1,512]
dma.q10 hbm:Y.bfloat16[@106496][512,8][1,512] <- sbuf:div_1.bfloat16[p80@10240][1,8][1,512]
dma.q11 hbm:Y.bfloat16[@110592][512,8][1,512] <- sbuf:div_1.bfloat16[p88@10240][1,8][1,512]
dma.q12 hbm:Y.bfloat16[@114688][512,8][1,512] <- sbuf:div_1.bfloat16[p96@10240][1,8][1,512]
dma.q13 hbm:Y.bfloat16[@118784][512,8][1,512] <- sbuf:div_1.bfloat16[p104@10240][1,8][1,512]
dma.q14 hbm:Y.bfloat16[@122880][512,8][1,512] <- sbuf:div_1.bfloat16[p112@10240][1,8][1,512]
dma.q15 hbm:Y.bfloat16[@126976][512,8][1,512] <- sbuf:div_1.bfloat16[p120@10240][1,8][1,512]
