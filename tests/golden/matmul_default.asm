program matmul
tensor A input bfloat16[256,128]
tensor B input bfloat16[128,512]
tensor C output float32[256,512]
buffer C_acc sbuf part=0 partitions=128 offset=0 size=2048
buffer A_t sbuf part=0 partitions=128 offset=2048 size=512
buffer B_t sbuf part=0 partitions=128 offset=2560 size=4096
buffer mul sbuf part=0 partitions=128 offset=6656 size=8192
loop io 2:
  loop ko 32:
    dma.q0 sbuf:A_t.bfloat16[p0@2048][1,64][1,4] <- hbm:A.bfloat16[@16384*io+4*ko][128,64][1,4]
    dma.q1 sbuf:A_t.bfloat16[p64@2048][1,64][1,4] <- hbm:A.bfloat16[@8192+16384*io+4*ko][128,64][1,4]
    dma.q2 sbuf:B_t.bfloat16[p0@2560][1,12][4,512][1,4] <- hbm:B.bfloat16[@2048*ko][0,12][1,512][512,4]
    dma.q3 sbuf:B_t.bfloat16[p12@2560][1,12][4,512][1,4] <- hbm:B.bfloat16[@2048*ko][0,12][1,512][512,4]
    dma.q4 sbuf:B_t.bfloat16[p24@2560][1,8][4,512][1,4] <- hbm:B.bfloat16[@2048*ko][0,8][1,512][512,4]
    dma.q5 sbuf:B_t.bfloat16[p32@2560][1,8][4,512][1,4] <- hbm:B.bfloat16[@2048*ko][0,8][1,512][512,4]
    dma.q6 sbuf:B_t.bfloat16[p40@2560][1,8][4,512][1,4] <- hbm:B.bfloat16[@2048*ko][0,8][1,512][512,4]
    dma.q7 sbuf:B_t.bfloat16[p48@2560][1,8][4,512][1,4] <- hbm:B.bfloat16[@2048*ko][0,8][1,512][512,4]
    dma.q8 sbuf:B_t.bfloat16[p56@2560][1,8][4,512][1,4] <- hbm:B.bfloat16[@2048*ko][0,8][1,512][512,4]
    dma.q9 sbuf:B_t.bfloat16[p64@2560][1,8][4,512][1,4] <- hbm:B.bfloat16[@2048*ko][0,8][1,512][512,4]
    dma.q10 sbuf:B_t.bfloat16[p72@2560][1,8][4,512][1,4] <- hbm:B.bfloat16[@2048*ko][0,8][1,512][512,4]
    dma.q11 sbuf:B_t.bfloat16[p80@2560][1,8][4,512][1,4] <- hbm:B.bfloat16[@2048*ko][0,8][1,512][512,4]
    dma.q12 sbuf:B_t.bfloat16[p88@2560][1,8][4,512][1,4] <- hbm:B.bfloat16[@2048*ko][0,8][1,512][512,4]
    dma.q13 sbuf:B_t.bfloat16[p96@2560][1,8][4,512][1,4] <- hbm:B.bfloat16[@2048*ko][0,8][1,512][512,4]
    dma.q14 sbuf:B_t.bfloat16[p104@2560][1,8][4,512][1,4] <- hbm:B.bfloat16[@2048*ko][0,8][1,512][512,4]
    dma.q0 sbuf:B_t.bfloat16[p112@2560][1,8][4,512][1,4] <- hbm:B.bfloat16[@2048*ko][0,8][1,512][512,4]
    dma.q1 sbuf:B_t.bfloat16[p120@2560][1,8][4,512][1,4] <- hbm:B.bfloat16[@2048*ko][0,8][1,512][512,4]
    tensor_tensor.dve sbuf:mul.float32[p0@6656][1,128][4,352][1,4] <- sbuf:A_t.bfloat16[p0@2048][1,128][0,352][1,4], sbuf:B_t.bfloat16[p0@2560][1,128][4,352][1,4] op=mul
    tensor_tensor.pool sbuf:mul.float32[p0@12288][1,128][4,160][1,4] <- sbuf:A_t.bfloat16[p0@2048][1,128][0,160][1,4], sbuf:B_t.bfloat16[p0@5376][1,128][4,160][1,4] op=mul
    tensor_reduce.pool sbuf:C_acc.float32[p0@0][1,128][1,512] <- sbuf:mul.float32[p0@6656][1,128][4,512][1,4] acc=add op=add reset_on=[ko]
  dma.q15 hbm:C.float32[@65536*io][512,24][1,512] <- sbuf:C_acc.float32[p0@0][1,24][1,512]
  dma.q15 hbm:C.float32[@12288+65536*io][512,24][1,512] <- sbuf:C_acc.float32[p24@0][1,24][1,512]
  dma.q15 hbm:C.float32[@24576+65536*io][512,20][1,512] <- sbuf:C_acc.float32[p48@0][1,20][1,512]
  dma.q15 hbm:C.float32[@34816+65536*io][512,20][1,512] <- sbuf:C_acc.float32[p68@0][1,20][1,512]
  dma.q15 hbm:C.float32[@45056+65536*io][512,20][1,512] <- sbuf:C_acc.float32[p88@0][1,20][1,512]
  dma.q15 hbm:C.float32[@55296+65536*io][512,20][1,512] <- sbuf:C_acc.float32[p108@0][1,20][1,512]
