
(function(){
"use strict";
/* D: the run, the lists the index's codes point into, where the index parts and the card pages are
   ([script name or null when in this page, first row]), the first index part (D.rows). */
var D=JSON.parse(document.getElementById("nst-data").textContent);
function $(id){return document.getElementById(id);}
var grid=$("cards"),more=$("more"),loading=$("loading"),total=D.total;
/* Positions in an index entry (nst_run.report._RunView.row). */
var I_ID=0,I_ST=1,I_SY=2,I_VE=3,I_LOSS=4,I_SD=5,I_CD=6,I_DUR=7,I_P=8,I_Q=9;
var NUMERIC={loss:I_LOSS,sd:I_SD,cd:I_CD,dur:I_DUR};
var R=new Array(total),loadedParts=0,ready=false;
var cards={},html={},pending={};
var view={order:null,limit:D.step,token:0},dir=1;
var empty=document.createElement("p");empty.className="empty";empty.textContent="No row matches these filters.";
var collator=new Intl.Collator(undefined,{numeric:true});
var controls=["f-q","f-status","f-style","f-param","f-verdict","f-sd","f-loss","sort","sort-dir"];
Array.prototype.forEach.call(grid.querySelectorAll("article.card"),function(c){cards[c.getAttribute("data-i")]=c;});
function script(name){
  return new Promise(function(resolve,reject){
    var s=document.createElement("script");s.src=D.dir+name;s.onload=resolve;
    s.onerror=function(){reject(name);};document.head.appendChild(s);
  });
}
function partOf(parts,i){var lo=0,hi=parts.length-1;while(lo<hi){var mid=(lo+hi+1)>>1;if(parts[mid][1]<=i)lo=mid;else hi=mid-1;}return lo;}
/* Called by the data scripts beside the page (report-files/): a part of the index, a page of cards. */
window.nstReport={
  index:function(start,rows){for(var j=0;j<rows.length;j++)R[start+j]=rows[j];partLoaded();},
  cards:function(start,list){html[start]=list;}
};
function partLoaded(){loadedParts++;if(loadedParts===D.index.length){ready=true;enable(true);apply();}}
function enable(on){controls.forEach(function(id){var el=$(id);if(el)el.disabled=!on;});}
function failed(name){loading.textContent="could not load "+D.dir+name+" (is the report-files folder beside this page?)";}
function loadPage(k){
  var part=D.pages[k];
  if(!pending[k])pending[k]=script(part[0]);
  return pending[k];
}
function card(i){
  if(cards[i])return cards[i];
  var k=partOf(D.pages,i),start=D.pages[k][1],t=document.createElement("template");
  t.innerHTML=html[start][i-start];
  return (cards[i]=t.content.firstElementChild);
}
function count(){return view.order?view.order.length:total;}
function at(j){return view.order?view.order[j]:j;}
function render(){
  var token=++view.token,n=count(),upto=Math.min(view.limit,n),want=[],need={};
  for(var j=0;j<upto;j++){
    var i=at(j);want.push(i);
    if(!cards[i]){var k=partOf(D.pages,i);if(D.pages[k][0]&&!html[D.pages[k][1]])need[k]=1;}
  }
  var keys=Object.keys(need);
  loading.textContent=keys.length?"loading "+keys.length+" page"+(keys.length===1?"":"s")+" of cards\u2026":"";
  Promise.all(keys.map(loadPage)).then(function(){
    if(token!==view.token)return;
    loading.textContent="";
    var frag=document.createDocumentFragment();
    want.forEach(function(i){frag.appendChild(card(i));});
    if(!n)frag.appendChild(empty);
    grid.replaceChildren(frag);
    more.hidden=upto>=n;
    $("shown").textContent=upto===n?n+" of "+total+" rows shown":upto+" of "+n+" matching rows shown ("+total+" rows)";
    paint();
  },failed);
}
function num(v){var x=parseFloat(v);return isFinite(x)?x:null;}
function sortKey(k){
  /* One key per row (null sorts last whichever the direction), compared as numbers or as text. */
  if(k==="row")return null;
  if(k in NUMERIC){var p=NUMERIC[k];return function(r){return r[p];};}
  if(k==="id")return function(r){return r[I_ID]||null;};
  if(k==="status")return function(r){return r[I_ST]>=0?D.statuses[r[I_ST]]:null;};
  if(k==="style")return function(r){return r[I_SY]>=0?D.styles[r[I_SY]]:null;};
  if(k.slice(0,2)==="p:"){
    var n=k.slice(2),at=-1;D.params.forEach(function(p,j){if(p[0]===n)at=j;});
    return function(r){var c=at>=0?r[I_P][at]:-1;return c>=0?c:null;};
  }
  return null;
}
function apply(){
  if(!ready)return;
  var q=$("f-q").value.trim().toLowerCase(),st=$("f-status").value,sy=$("f-style").value,
      pv=$("f-param")?$("f-param").value:"",ve=$("f-verdict").value,msd=num($("f-sd").value),ml=num($("f-loss").value),
      k=$("sort").value,pf=pv?JSON.parse(pv):null;
  var stc=st?D.statuses.indexOf(st):-2,syc=sy?D.styles.indexOf(sy):-2,vec=ve?D.verdicts.indexOf(ve):-2,pat=-1,pcode=-2;
  if(pf)D.params.forEach(function(p,j){if(p[0]===pf[0]){pat=j;pcode=p[1].indexOf(pf[1]);}});
  /* An item id is kept to its first D.item_chars digits: a longer hex query is matched on those. */
  var qi=(q.length>D.item_chars&&/^[0-9a-f]+$/.test(q))?q.slice(0,D.item_chars):null;
  var order=[];
  for(var i=0;i<total;i++){
    var r=R[i];
    if(q&&r[I_Q].indexOf(q)<0&&(D.statuses[r[I_ST]]||"").indexOf(q)<0&&!(qi&&r[I_Q].indexOf(qi)>=0))continue;
    if(st&&r[I_ST]!==stc)continue;
    if(sy&&r[I_SY]!==syc)continue;
    if(ve&&r[I_VE]!==vec)continue;
    if(pf&&(pat<0||r[I_P][pat]!==pcode))continue;
    if(msd!==null&&(r[I_SD]===null||r[I_SD]>msd))continue;
    if(ml!==null&&(r[I_LOSS]===null||r[I_LOSS]>ml))continue;
    order.push(i);
  }
  var key=sortKey(k);
  if(key){
    var keys=new Array(total);order.forEach(function(i){keys[i]=key(R[i]);});
    order.sort(function(a,b){
      var x=keys[a],y=keys[b];
      if(x===null)return y===null?a-b:1;
      if(y===null)return -1;
      var c=(typeof x==="number"&&typeof y==="number")?x-y:collator.compare(String(x),String(y));
      return c===0?a-b:c*dir;
    });
  }else if(dir<0)order.reverse();
  view.order=order;view.limit=D.step;render();
}
controls.slice(0,8).forEach(function(id){
  var el=$(id);if(el){el.addEventListener("input",apply);el.addEventListener("change",apply);}
});
$("sort-dir").addEventListener("click",function(){dir=-dir;this.textContent=dir>0?"\u25B2":"\u25BC";apply();});
more.addEventListener("click",function(){view.limit+=D.step;render();});
/* A click on an image opens it at full size: the stored original where the page reaches it, else the thumbnail. */
var zoom=null;
function closeZoom(){if(zoom){zoom.remove();zoom=null;}}
function openZoom(img){
  closeZoom();
  zoom=document.createElement("div");zoom.id="zoom";zoom.setAttribute("role","dialog");zoom.setAttribute("aria-label",img.alt);
  var big=document.createElement("img"),note=document.createElement("p"),full=img.getAttribute("data-full");
  big.alt=img.alt;note.textContent=img.alt+(full?"":" (thumbnail: the original is not reachable from this page)");
  big.addEventListener("error",function(){if(big.getAttribute("src")!==img.getAttribute("src")){big.src=img.getAttribute("src");note.textContent=img.alt+" (thumbnail: the original is not beside this copy)";}});
  big.src=full||img.getAttribute("src");
  zoom.appendChild(big);zoom.appendChild(note);zoom.addEventListener("click",closeZoom);document.body.appendChild(zoom);
}
document.addEventListener("keydown",function(ev){if(ev.key==="Escape")closeZoom();});
/* Marks made on this page, kept in this browser, saved as a file for `nst review RUN --from-file FILE`. */
var store={},skey="nst-review:"+D.run;
try{store=JSON.parse(window.localStorage.getItem(skey)||"{}")||{};}catch(err){store={};}
function save(){try{window.localStorage.setItem(skey,JSON.stringify(store));}catch(err){}}
function paint(){
  Array.prototype.forEach.call(grid.querySelectorAll("article.card"),function(c){
    var m=null;
    Array.prototype.forEach.call(c.querySelectorAll("footer .mark button"),function(b){
      var s=store[b.getAttribute("data-item")],on=!!s&&s.decision===b.getAttribute("data-act");m=s||m;
      b.classList.toggle("on",on);b.setAttribute("aria-pressed",on?"true":"false");
    });
    c.classList.toggle("marked-keep",!!m&&m.decision==="keep");c.classList.toggle("marked-reject",!!m&&m.decision==="reject");
  });
  var n=Object.keys(store).length;$("pending").hidden=n===0;$("pending-n").textContent=n+(n===1?" decision":" decisions");
}
grid.addEventListener("click",function(ev){
  var pic=ev.target.closest?ev.target.closest(".imgs img"):null;if(pic){openZoom(pic);return;}
  var b=ev.target.closest?ev.target.closest("button[data-act]"):null;if(!b)return;
  var item=b.getAttribute("data-item"),act=b.getAttribute("data-act");
  if(store[item]&&store[item].decision===act)delete store[item];else store[item]={item_id:item,id:b.getAttribute("data-id"),decision:act};
  save();paint();
});
try{$("reviewer").value=window.localStorage.getItem("nst-reviewer")||"";}catch(err){}
function payload(){
  var who=$("reviewer").value.trim();try{window.localStorage.setItem("nst-reviewer",who);}catch(err){}
  return {format:D.format,run:D.run,run_uri:D.run_uri,reviewer:who,decisions:Object.keys(store).map(function(k){return store[k];})};
}
$("save").addEventListener("click",function(){
  var p=payload();if(!p.reviewer){$("reviewer").focus();return;}
  var blob=new Blob([JSON.stringify(p,null,2)],{type:"application/json"}),a=document.createElement("a");
  a.href=URL.createObjectURL(blob);a.download="decisions-"+D.run+".json";document.body.appendChild(a);a.click();
  setTimeout(function(){URL.revokeObjectURL(a.href);a.remove();},1000);
});
$("clear").addEventListener("click",function(){store={};save();paint();});
paint();
/* The index: its first part is in this page, the others load beside it; sorting and filtering wait for all. */
enable(false);
window.nstReport.index(0,D.rows);
D.index.slice(1).forEach(function(part){script(part[0]).catch(failed);});
})();
